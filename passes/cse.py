from __future__ import annotations

from dataclasses import dataclass

from compose import families
from compose.ir import Graph
from compose.ir.state import Shared
from compose.ir.weights import Const, Expr, Ones, Zeros, written_units
from compose.passes.base import Pass

# Made, not read: nothing is saved by making them once.
_FREE = (Zeros, Ones, Const)


@dataclass(frozen=True)
class CSE(Pass):
    """Common weight expressions: find each expression that several output tensors are, or are assembled
    from (an upcycled dense FFN in E experts, the same merge written twice), and record them in
    `state.shared` with the names they are written under. The hf backend evaluates (or reads) each once
    and writes it wherever it is used, instead of reading the source E times, where its uses lie close
    enough in the file to keep it in between (backends.hf). Runs after target: the names are the target
    class's."""

    name = "cse"

    def run(self, g: Graph) -> Graph:
        if g.state.target is None:
            return g
        uses: dict[Expr, list[str]] = {}
        for _, named in families.get(g.state.target.family).tensors(g):
            for name, e in named.items():
                for u in written_units(e):
                    if not isinstance(u, _FREE):
                        uses.setdefault(u, []).append(name)
        shared = tuple(Shared(e, tuple(names)) for e, names in uses.items() if len(names) > 1)
        return g.replace(shared=shared)
