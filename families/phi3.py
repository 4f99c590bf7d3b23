"""Phi-3 and Phi-3.5 (dense): Mistral's block with fused projections. `self_attn.qkv_proj` holds q, k and
v stacked by rows, and `mlp.gate_up_proj` holds gate then up. There are no biases, one model-wide
`sliding_window`, and `longrope` (short and long factors) in the long-context models.

The IR keeps the fused matrices fused (`Attention.fused`, `DenseFFN.fused`). A merge then sees each as one
tensor, as mergekit does: slerp's norms and TIES/DARE's magnitude ranks are over the whole matrix, and
would differ if q/k/v or gate/up were merged apart.
"""
from __future__ import annotations

from compose.families.base import Family, model_window, refuse_unless_one_window
from compose.ir.graph import Graph


class Phi3(Family):
    model_type = "phi3"
    architecture = "Phi3ForCausalLM"
    dense = "phi3"
    moe_targets = ()
    fused = True
    default_max_positions = 4096
    keys = ("sliding_window", "resid_pdrop", "embd_pdrop")
    tiny_options = {"tie": 0}

    def biases_of(self, g: Graph):
        return False, False, False

    def window(self, c, i, where):
        return model_window(c, where)

    def refuse_windows(self, g: Graph) -> str | None:
        return refuse_unless_one_window(g, self.architecture)

    def own_config(self, g: Graph) -> dict:
        return {"sliding_window": g.blocks()[0][1].attn.window}

    def tiny_config(self, o):
        # Phi3Config's default pad id (32000) lies past a tiny vocabulary: the last id pads.
        return {**super().tiny_config(o), "sliding_window": None, "pad_token_id": o["vocab"] - 1}


FAMILY = Phi3()
