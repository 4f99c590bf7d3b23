"""What a pass is: a frozen, named unit with one `run(graph) -> graph` and no hidden state."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compose.ir import Graph


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = "pass"

    def run(self, g: Graph) -> Graph:
        raise NotImplementedError
