from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compose.families.base import moe_blocks
from compose.ir import Graph
from compose.passes.base import Pass


@dataclass(frozen=True)
class StackExperts(Pass):
    """Each MoE layer's experts as one stacked tensor per projection in the generated module: gate_up_proj
    (E, 2I, H) and down_proj (E, H, I), as transformers 5 holds them, so routed tokens go through one
    grouped GEMM (or one batched matmul) instead of E small ones. A per-expert checkpoint is stacked as it
    loads; compose_moe's checkpoint is stacked already. Composites hold no experts of this kind, and a
    generated target's checkpoint is stacked on disk, so the decision holds for every MoE graph."""

    name = "stack-experts"

    def run(self, g: Graph) -> Graph:
        if not moe_blocks(g) or g.state.fusion.experts == "stacked":
            return g
        return g.replace(fusion=dataclasses.replace(g.state.fusion, experts="stacked"))
