from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compose.ir import CrossAttention, DecoderBlock, Graph
from compose.passes.base import Pass


@dataclass(frozen=True)
class Trainable(Pass):
    """Mark what trains. Under `meta["train"] == "new"` (LLaMA-Pro) only new blocks do; under "cross"
    (CALM) only the cross-attention layers; otherwise (a plain or up-scaled model: continued
    pre-training) everything does."""

    name = "trainable"

    def run(self, g: Graph) -> Graph:
        mode = g.meta.get("train")

        def trains(op) -> bool:
            if mode == "new":
                return isinstance(op, DecoderBlock) and op.origin.new
            if mode == "cross":
                return isinstance(op, CrossAttention)
            return True

        return g.replace({n: dataclasses.replace(op, trainable=trains(op)) for n, op in g.items()})
