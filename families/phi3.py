"""Phi-3, Phi-3.5 and Phi-4-mini (dense): Mistral's block with fused projections. `self_attn.qkv_proj` holds
q, k and v stacked by rows, and `mlp.gate_up_proj` holds gate then up. There are no biases and one
model-wide `sliding_window`. The long-context models have `longrope` (short and long factors), and
Phi-4-mini rotates only 3/4 of each head (`partial_rotary_factor`).

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
    gguf_arch = "phi3"  # llama.cpp's phi3 reads the fused attn_qkv and gate/up as they are stored
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
        # Phi3Config reads these two at the top level (its defaults, 4096 and 1.0, would win over
        # rope_parameters'): longrope switches factors past the original context, Phi-4-mini rotates 3/4.
        # The share that rotates goes there with the legacy rope keys (rope_config), when the rope has one:
        # without, the default 1.0 is the rope's (so a build of a build writes the same file).
        rope = g.config.rope
        out = {"sliding_window": g.blocks()[0][1].attn.window}
        if rope.original_max_positions is not None:
            out["original_max_position_embeddings"] = rope.original_max_positions
        return out

    def rope_config(self, g: Graph) -> dict:
        # transformers 4.x's Phi3Config takes a rope_scaling of exactly `type`, `short_factor` and
        # `long_factor` (a longrope with a factor of its own it refuses by name, rather than misreading it).
        out = super().rope_config(g)
        if "rope_scaling" in out:
            scaling = dict(out["rope_scaling"])
            out["rope_scaling"] = {"type": scaling.pop("rope_type"), **scaling}
        return out

    def tiny_config(self, o):
        # Phi3Config's default pad id (32000) lies past a tiny vocabulary: the last id pads.
        return {**super().tiny_config(o), "sliding_window": None, "pad_token_id": o["vocab"] - 1}


FAMILY = Phi3()
