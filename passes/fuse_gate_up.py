from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compose.ir import Graph
from compose.passes.base import Pass
from compose.passes.fusion import fusable


@dataclass(frozen=True)
class FuseGateUp(Pass):
    """gate and up as one matmul in the generated module's gated MLPs (dense layers and shared experts):
    x @ [Wgate; Wup]^T, chunked after. Routed experts are stacked that way already (stack-experts). The
    checkpoint keeps its tensors; the module concatenates them as it loads (see fuse-qkv)."""

    name = "fuse-gate-up"

    def run(self, g: Graph) -> Graph:
        if not fusable(g) or g.state.fusion.gate_up:
            return g
        return g.replace(fusion=dataclasses.replace(g.state.fusion, gate_up=True))
