from __future__ import annotations

from dataclasses import dataclass

from compose.ir import Embedding, Graph
from compose.passes.base import Pass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class Cost(Pass):
    """Parameters, trainable parameters, FLOPs per token and bytes, in `meta["cost"]`.

    FLOPs per token count 2 per weight of every matrix a token is multiplied by (projections and the LM
    head; the embedding is a lookup), the usual 2N estimate; attention scores, which grow with context,
    are left out. A tied head shares the embedding's parameters, counted once.
    """

    name = "cost"

    def run(self, g: Graph) -> Graph:
        params = trainable = flops = 0
        for _, op in g.items():
            for e in op.params().values():
                if not isinstance(op, Embedding) and len(e.shape) == 2:
                    flops += 2 * e.numel
                if getattr(op, "tied", False):
                    continue  # the tied head's matrix is the embedding's: counted once
                params += e.numel
                trainable += e.numel if op.trainable else 0
        nbytes = params * DTYPE_BYTES.get(g.config.dtype, 4)
        cost = {"layers": len(g.blocks()), "params": params, "trainable_params": trainable,
                "flops_per_token": flops, "bytes": nbytes}
        return g.replace(meta={"cost": cost})
