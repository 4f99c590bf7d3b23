"""Lowering: a spec tree -> an architecture Graph whose every weight is an expression.

One module per spec op, dispatched on the spec's `op` tag from LOWERINGS; each is `lower(spec, path, ctx)`
and gets its inputs' graphs through `ctx.input`, so no op module imports another or this package (no
import circle), and none imports the front door: the caller hands over how sources are opened. Errors
name the spec field (`model.model.groups`). Nothing here reads tensor data, except the data-driven router
initialisation of `moe` (lower/router.py).
"""
from __future__ import annotations

from typing import Callable

from compose.errors import SpecError
from compose.ir.graph import Graph
from compose.lower import calm, expand, load, merge, moe, stack, vision
from compose.lower.context import Context

LOWERINGS: dict[str, Callable[[object, str, Context], Graph]] = {
    "load": load.lower,
    "expand_blocks": expand.lower,
    "depth_upscale": stack.lower_upscale,
    "layers": stack.lower_layers,
    "stack": stack.lower_stack,
    "merge": merge.lower,
    "moe": moe.lower,
    "calm": calm.lower,
    "visual_expert": vision.lower,
}


def lower(spec, open_source: Callable[[str], object], path: str = "model") -> Graph:
    """The graph of `spec` (a compose.spec model), its sources opened with `open_source`."""
    ctx = Context(open=open_source, input=lambda s, p: lower_one(s, p, ctx))
    return _dispatch(spec, path, ctx)


def _dispatch(spec, path: str, ctx: Context) -> Graph:
    fn = LOWERINGS.get(getattr(spec, "op", None))
    if fn is None:
        raise SpecError(f"{path}: expected a model ({', '.join(LOWERINGS)}), got {type(spec).__name__}")
    return fn(spec, path, ctx)


def lower_one(spec, path: str, ctx: Context) -> Graph:
    """`spec` lowered, when it is one model: a composite (CALM, CogVLM) cannot go through the structural
    ops, merges or other compositions yet."""
    g = _dispatch(spec, path, ctx)
    if g.composite == "cogvlm":
        raise SpecError(f"{path}: a model with visual experts cannot be composed further yet; apply other "
                        "operations to the language model first")
    if g.composite == "calm":
        raise SpecError(f"{path}: a CALM model cannot be expanded, up-scaled, sliced, stacked, merged or "
                        "turned into experts yet; apply those to the anchor or augmenting model first")
    return g


__all__ = ["LOWERINGS", "Context", "lower", "lower_one"]
