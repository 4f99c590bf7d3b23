"""Lowering of `layers`, `stack` and `depth_upscale` (SOLAR): layer ranges of models stacked in order.

The embeddings (and the tokenizer) come from the first slice's model, the final norm and head from the
last's (mergekit's passthrough rule; a tied head stays tied to the embeddings). Layers no slice takes stay
off the chain, so dead-weight elimination drops them and they are never read.
"""
from __future__ import annotations

from compose.errors import SpecError
from compose.ir.graph import Graph
from compose.lower.common import rebuild, unused
from compose.lower.limits import check_layers

_MUST_MATCH = ("family", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "qkv_bias", "o_bias",
               "mlp_bias", "rope", "local_rope",
               "query_scale", "attn_softcap", "final_softcap")


def take_layers(g: Graph, start: int, stop: int, path: str) -> Graph:
    blocks = [op for _, op in g.blocks()]
    if stop > len(blocks):
        raise SpecError(f"{path}.stop: {stop} is past the model's {len(blocks)} layers")
    return rebuild(g, blocks[start:stop], unused(g) + blocks[:start] + blocks[stop:])


def stack(graphs: list[Graph], path: str) -> Graph:
    first = graphs[0]
    for i, g in enumerate(graphs[1:], 1):
        if first.derived or g.derived:
            _same_tensors(first, g, f"{path}.slices[{i}]")
            continue
        for f in _MUST_MATCH:
            a, b = getattr(first.config, f), getattr(g.config, f)
            if a != b:
                raise SpecError(f"{path}.slices[{i}]: {f} {b} does not match slices[0]'s {a} "
                                "(stacked slices need one family and width)")
    blocks = [op for g in graphs for _, op in g.blocks()]
    live = set(blocks)
    dropped = list(dict.fromkeys(b for g in graphs for b in unused(g) if b not in live))
    train = "new" if any(g.state.train == "new" for g in graphs) else "all"
    last = graphs[-1]
    if first.derived:  # the stem (embeddings, a vision tower) from the first, the tail from the last
        return Graph.layered(first.config, first.embedding, blocks, last.tail, dropped, first.state.but(train=train))
    head = first.head if first.config.tie_embeddings else last.head
    return Graph.decoder(first.config, first.embedding, blocks, last.final_norm, head, dropped,
                         first.state.but(train=train))


def _same_tensors(first: Graph, g: Graph, where: str) -> None:
    """Slices of a derived family stack when they are one class with the same tensors outside the stack."""
    if first.config.family != g.config.family:
        raise SpecError(f"{where}: a {g.config.family} model cannot stack with slices[0]'s {first.config.family}")
    for part in ("embedding", "tail"):
        a, b = dict(getattr(first, part).shapes), dict(getattr(g, part).shapes)
        diff = sorted(set(a) ^ set(b)) or [k for k in a if a[k] != b[k]]
        if diff:
            raise SpecError(f"{where}: tensor {diff[0]} differs from slices[0]'s (stacked slices need one family "
                            "and width)")


def lower_layers(spec, path: str, ctx) -> Graph:
    return take_layers(ctx.input(spec.model, f"{path}.model"), spec.start, spec.stop, path)


def lower_stack(spec, path: str, ctx) -> Graph:
    check_layers(len(spec.slices), f"{path}.slices", f"{len(spec.slices):,} slices")  # each has a layer at least
    graphs = [ctx.input(s, f"{path}.slices[{i}]") for i, s in enumerate(spec.slices)]
    check_layers(sum(len(g.blocks()) for g in graphs), f"{path}.slices", "the slices")
    return stack(graphs, path)


def lower_upscale(spec, path: str, ctx) -> Graph:
    g = ctx.input(spec.model, f"{path}.model")
    n = len(g.blocks())
    if spec.drop >= n:
        raise SpecError(f"{path}.drop: {spec.drop} must be less than the model's {n} layers")
    check_layers(2 * (n - spec.drop), f"{path}.drop", "two copies of the model")
    return stack([take_layers(g, 0, n - spec.drop, path), take_layers(g, spec.drop, n, path)], path)
