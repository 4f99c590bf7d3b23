from __future__ import annotations

from dataclasses import dataclass

from compose.ir import DecoderBlock, Embedding, Graph, MoE
from compose.ir.state import Cost as CostRecord
from compose.passes.base import Pass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def _numel(op) -> int:
    return sum(e.numel for e in op.params().values())


def inactive(block: DecoderBlock) -> int:
    """Parameters of a block that a token does not use: the routed experts its router leaves out, and
    one of the language and visual weights (a token uses one or the other)."""
    n = 0 if block.vision is None else _numel(block.vision)
    if not isinstance(block.ffn, MoE):
        return n
    m = block.ffn
    return n + (m.router.experts - m.router.top_k) * _numel(m.experts[0])


@dataclass(frozen=True)
class Cost(Pass):
    """Parameters, active parameters per token, trainable parameters, FLOPs per token and bytes, in
    `state.cost`.

    FLOPs per token count 2 per weight of every matrix a token is multiplied by (projections, the router,
    the top-k experts and shared experts of an MoE, and the LM head; the embedding is a lookup), the usual
    2N estimate; attention scores, which grow with context, are left out. A tied head shares the
    embedding's parameters, counted once. Active parameters are those a token's forward pass reads.
    """

    name = "cost"

    def run(self, g: Graph) -> Graph:
        params = trainable = flops = skipped = 0
        for _, op in g.items():
            for e in op.params().values():
                if not isinstance(op, Embedding) and len(e.shape) == 2:
                    flops += 2 * e.numel
                if getattr(op, "tied", False):
                    continue  # the tied head's matrix is the embedding's: counted once
                params += e.numel
                trainable += e.numel if op.trainable else 0
            if isinstance(op, DecoderBlock):
                skipped += inactive(op)
                if op.vision is not None and op.vision.trainable and not op.trainable:
                    trainable += _numel(op.vision)
        flops -= 2 * skipped  # every expert's matrices are 2D: take the unrouted ones back out
        nbytes = params * DTYPE_BYTES.get(g.config.dtype, 4)
        return g.replace(cost=CostRecord(layers=len(g.blocks()), params=params, active_params=params - skipped,
                                         trainable_params=trainable, flops_per_token=flops, bytes=nbytes))
