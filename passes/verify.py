from __future__ import annotations

from dataclasses import dataclass

from compose.ir import Graph
from compose.ir.verify import verify
from compose.passes.base import Pass


@dataclass(frozen=True)
class Verify(Pass):
    """Shape and structure verification; changes nothing, raises IRError naming the node."""

    name = "verify"

    def run(self, g: Graph) -> Graph:
        verify(g)
        return g
