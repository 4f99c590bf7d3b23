from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compose.ir import Graph
from compose.passes.base import Pass
from compose.passes.fusion import fusable


@dataclass(frozen=True)
class FuseQKV(Pass):
    """q, k and v as one matmul in the generated module: x @ [Wq; Wk; Wv]^T, split after.

    One GEMM instead of three reads x once and launches one kernel, which is what batch-1 decode on a CPU
    (or a GPU without CUDA graphs) pays for. The checkpoint keeps its three tensors (the hf output is
    byte-identical with or without this pass); the module concatenates them as it loads. A checkpoint
    that already holds one qkv_proj (Phi-3) is fused as it stands. See passes.fusion for the graphs that
    stay unfused."""

    name = "fuse-qkv"

    def run(self, g: Graph) -> Graph:
        if not fusable(g) or g.state.fusion.qkv:
            return g
        return g.replace(fusion=dataclasses.replace(g.state.fusion, qkv=True))
