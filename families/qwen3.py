"""Qwen3 (dense): Qwen2's layout without the q/k/v biases (`attention_bias`, default off), an RMSNorm over
each query and key head before rope (`q_norm`, `k_norm`, of head_dim), an explicit `head_dim` that need
not be hidden / heads, and Qwen2's per-layer sliding windows (`layer_types`)."""
from __future__ import annotations

from compose.families.base import Family, layer_types_config, one_window_size, qwen2_window
from compose.families.llama import flag
from compose.ir.graph import Graph


class Qwen3(Family):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    dense = "qwen3"
    moe_targets = ("qwen3_moe",)
    gguf_arch = "qwen3"
    mergekit_moe = frozenset({"Qwen3 MoE"})
    qk_norm = True
    default_max_positions = 32768
    keys = ("attention_bias", "use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
    # Qwen3-0.6B ties its embeddings and has head_dim 128 for hidden 1024 and 16 heads: the tiny one too.
    tiny_options = {"tie": 1}

    def biases(self, c, where):
        attention = flag(c, "attention_bias", where)
        return attention, attention, False

    def biases_of(self, g: Graph):
        return g.config.qkv_bias, g.config.qkv_bias, False

    def window(self, c, i, where):
        return qwen2_window(c, i, where)

    def refuse_windows(self, g: Graph) -> str | None:
        return one_window_size(g, self.architecture)

    def own_config(self, g: Graph) -> dict:
        return {"attention_bias": g.config.qkv_bias, **layer_types_config(g)}

    def tiny_config(self, o):
        return {**super().tiny_config(o), "head_dim": 2 * o["hidden"] // o["heads"], "attention_bias": False,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": o["layers"],
                "layer_types": ["full_attention"] * o["layers"]}


FAMILY = Qwen3()
