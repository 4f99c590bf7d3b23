from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compose.ir import DecoderBlock, Graph
from compose.passes.base import Pass


@dataclass(frozen=True)
class Trainable(Pass):
    """Mark what trains. Under `meta["train"] == "new"` (LLaMA-Pro) only new blocks do and everything
    else is frozen; otherwise (a plain or up-scaled model: continued pre-training) everything does."""

    name = "trainable"

    def run(self, g: Graph) -> Graph:
        only_new = g.meta.get("train") == "new"

        def trains(op) -> bool:
            return not only_new or (isinstance(op, DecoderBlock) and op.origin.new)

        return g.replace({n: dataclasses.replace(op, trainable=trains(op)) for n, op in g.items()})
