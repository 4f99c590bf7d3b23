"""What the fusion passes share: whether the generated module of a graph may hold fused projections.

Fusing only changes how the generated module (and the ONNX graphs exported from it) computes: it holds
one qkv_proj where the checkpoint holds q_proj, k_proj and v_proj, and concatenates them as it loads.
That needs a module whose loading compose writes. Two kinds of graph load otherwise, so they stay as the
checkpoint is: a composite (CALM, CogVLM: the glue module loads the parts' modules by their checkpoint
names) and a target written as generated code behind an auto_map (transformers' own loader fills the
modules by name).
"""
from __future__ import annotations

from compose import families
from compose.ir import Graph


def fusable(g: Graph) -> bool:
    if g.composite is not None or not g.blocks() or g.derived:
        return False
    return g.state.target is None or not families.get(g.state.target.family).generated
