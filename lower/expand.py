"""Lowering of `expand_blocks` (LLaMA-Pro): identity copies after each group of layers; only they train."""
from __future__ import annotations

import dataclasses

from compose.errors import SpecError
from compose.ir.graph import Graph
from compose.ir.nodes import Block
from compose.ir.weights import Zeros
from compose.lower.common import rebuild, unused
from compose.lower.limits import check_layers


def identity_copy(block: Block) -> Block:
    """LLaMA-Pro's new block: a copy whose output projections are zero, so it adds exactly 0. In an MoE
    block that is every expert's down projection (and the shared expert's): whichever experts the router
    picks, each adds 0. A derived family's layer says which of its tensors those are."""
    names = set(block.residual_outputs())
    zero = {k: Zeros(e.shape, e.dtype) for k, e in block.params().items() if k in names}
    return dataclasses.replace(block.with_weights(**zero), origin=dataclasses.replace(block.origin, new=True))


def lower(spec, path: str, ctx) -> Graph:
    g = ctx.input(spec.model, f"{path}.model")
    blocks = [op for _, op in g.blocks()]
    n = len(blocks)
    if spec.groups is not None:
        if n % spec.groups:
            raise SpecError(f"{path}.groups: {spec.groups} does not divide the model's {n} layers")
        size = n // spec.groups
        positions = [(k + 1) * size - 1 for k in range(spec.groups)]
    else:
        positions = sorted(set(spec.positions or []))
        bad = [p for p in positions if p >= n]
        if bad:
            raise SpecError(f"{path}.positions: {bad} out of range for a model of {n} layers (0..{n - 1})")
    check_layers(n + len(positions) * spec.per_group, f"{path}.per_group",
                 f"{spec.per_group:,} identity blocks after each of {len(positions)} places")
    if g.derived:
        _check_derived(g, positions, path, ctx)
    out: list[Block] = []
    after = set(positions)
    for i, b in enumerate(blocks):
        out.append(b)
        if i in after:
            out.extend(identity_copy(b) for _ in range(spec.per_group))
    return rebuild(g, out, unused(g), train="new")


def _check_derived(g: Graph, positions: list[int], path: str, ctx) -> None:
    """Each layer a derived family's model copies must have residual-output projections, and zeroing them must
    make a layer of its class an exact identity (checked on a small random instance of the class)."""
    from compose.families.derived import check_identity

    blocks = [b for _, b in g.blocks()]
    for p in positions:
        b = blocks[p]
        if not b.zero:
            raise SpecError(f"{path}: layer {p} ({b.origin}) has no residual-output projections compose can zero, "
                            "so no identity copy of it exists")
        if b.origin.method is None and not b.origin.new and b.family is None:  # a module's math says it already
            check_identity(ctx.open(b.origin.source).config, b.origin.layer, f"{path}: layer {p} ({b.origin})")
