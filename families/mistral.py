"""Mistral: Llama's block without biases, and one sliding window for every layer (`sliding_window`, or
none when it is null)."""
from __future__ import annotations

from compose.families.base import Family, model_window, refuse_unless_one_window
from compose.ir.graph import Graph


class Mistral(Family):
    model_type = "mistral"
    architecture = "MistralForCausalLM"
    dense = "mistral"
    moe_targets = ("mixtral", "qwen2_moe")
    gguf_arch = "llama"  # llama.cpp's converter writes Mistral as llama
    mergekit_moe = frozenset({"Mixtral", "DeepSeek MoE", "Qwen MoE"})
    default_max_positions = 4096 * 32
    keys = ("sliding_window",)
    tiny_options = {"tie": 0, "window": 16}

    def window(self, c, i, where):
        return model_window(c, where)

    def biases_of(self, g: Graph):
        return False, False, False

    def refuse_windows(self, g: Graph) -> str | None:
        return refuse_unless_one_window(g, self.architecture)

    def own_config(self, g: Graph) -> dict:
        return {"sliding_window": g.blocks()[0][1].attn.window}

    def tiny_config(self, o):
        return {**super().tiny_config(o), "sliding_window": o["window"] or None}


FAMILY = Mistral()
