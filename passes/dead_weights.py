from __future__ import annotations

from dataclasses import dataclass

from compose.ir import DecoderBlock, Graph, Layer
from compose.passes.base import Pass


@dataclass(frozen=True)
class DeadWeights(Pass):
    """Dead-weight elimination: drop every node off the Embedding -> LMHead chain.

    Backends evaluate only the expressions of nodes in the graph, so after this pass a layer that no
    slice uses (SOLAR's cut layers) is never read from its source. What was dropped is kept in
    `state.dropped` so a dump still says so.
    """

    name = "dead-weights"

    def run(self, g: Graph) -> Graph:
        dead = g.dead()
        if not dead:
            return g
        dropped = tuple(sorted({(op.origin.source, op.origin.layer) for n in dead
                                if isinstance(op := g.op(n), (DecoderBlock, Layer))}))
        return g.remove(dead).replace(dropped=dropped)
