from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compose.ir import CrossAttention, DecoderBlock, Graph, Layer
from compose.ir.nodes import Adapter
from compose.passes.base import Pass


@dataclass(frozen=True)
class Trainable(Pass):
    """Mark what trains, by the graph's rule (`state.train`). Under `new` (LLaMA-Pro) only new blocks do; under `cross`
    (CALM) only the cross-attention layers; under `vision` (CogVLM) only the visual experts inside the
    blocks and the adapter; otherwise (a plain or up-scaled model: continued
    pre-training) everything does."""

    name = "trainable"

    def run(self, g: Graph) -> Graph:
        mode = g.state.train

        def trains(op) -> bool:
            if mode == "new":
                return isinstance(op, (DecoderBlock, Layer)) and op.origin.new
            if mode == "cross":
                return isinstance(op, CrossAttention)
            if mode == "vision":  # CogVLM: the visual experts (inside the blocks) and the adapter
                return isinstance(op, Adapter)
            return True

        def mark(op):
            op = dataclasses.replace(op, trainable=trains(op))
            if isinstance(op, DecoderBlock) and op.vision is not None:
                op = dataclasses.replace(op, vision=dataclasses.replace(op.vision, trainable=mode not in ("new", "cross")))
            return op

        return g.replace({n: mark(op) for n, op in g.items()})
