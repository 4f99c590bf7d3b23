"""Qwen2 and Qwen2.5: q/k/v biases (always), and per-layer sliding or full attention (`use_sliding_window`,
`sliding_window`, `max_window_layers`, `layer_types`): each block keeps its own, and layer_types is
written from them."""
from __future__ import annotations

from compose.families.base import Family, layer_types_config, one_window_size, qwen2_window
from compose.ir.graph import Graph


class Qwen2(Family):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    dense = "qwen2"
    moe_targets = ("qwen2_moe",)
    gguf_arch = "qwen2"
    mergekit_moe = frozenset({"Qwen MoE"})
    default_max_positions = 32768
    keys = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types")
    # Qwen2-0.5B ties its embeddings: so does the tiny one.
    tiny_options = {"tie": 1}

    def biases(self, c, where):
        return True, False, False

    def biases_of(self, g: Graph):
        return True, False, False

    def window(self, c, i, where):
        return qwen2_window(c, i, where)

    def refuse_windows(self, g: Graph) -> str | None:
        return one_window_size(g, self.architecture)

    def own_config(self, g: Graph) -> dict:
        return layer_types_config(g)

    def tiny_config(self, o):
        return {**super().tiny_config(o), "use_sliding_window": False, "sliding_window": None,
                "max_window_layers": o["layers"], "layer_types": ["full_attention"] * o["layers"]}


FAMILY = Qwen2()
