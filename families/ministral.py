"""Ministral (Ministral-8B-2410 as transformers 5 holds it): Mistral's block without biases, and per-layer
sliding or full attention (`layer_types`, one window size `sliding_window`): each block keeps its own, and
layer_types is written from them.

transformers' class is Qwen2's model with Mistral's bias-free projections. Its config has no
use_sliding_window: a layer slides exactly when layer_types says `sliding_attention` (without layer_types,
every layer slides when sliding_window is set). MinistralForCausalLM builds a sliding mask whatever the
layers are, so it runs only with sliding_window set (and head_dim, which compose always writes).
"""
from __future__ import annotations

from compose.errors import SourceError
from compose.families.base import Family, layer_types, layer_types_config, model_window, one_window_size
from compose.ir.graph import Graph

DEFAULT_WINDOW = 4096
"""MinistralConfig's sliding_window: what is written for a graph without sliding layers (it is unused there)."""


class Ministral(Family):
    model_type = "ministral"
    architecture = "MinistralForCausalLM"
    dense = "ministral"
    # Mixtral holds an MoE of it when every layer has the same window, Qwen2-MoE when they differ.
    moe_targets = ("mixtral", "qwen2_moe")
    # None: llama.cpp's converter maps no MinistralForCausalLM, and its llama has no per-layer windows.
    gguf_arch = None
    default_max_positions = 4096 * 32
    keys = ("sliding_window", "layer_types")
    # Every other layer slides over 16 tokens (`pattern`: every pattern-th layer attends to all earlier ones).
    tiny_options = {"tie": 0, "window": 16, "pattern": 2}

    def window(self, c, i, where):
        size = model_window(c, where)
        types = layer_types(c, where)
        if size is None:
            if types is not None and "sliding_attention" in types:
                raise SourceError(f"{where}: config.json layer_types has sliding_attention layers but "
                                  "sliding_window is null")
            return None
        return size if types is None or types[i] == "sliding_attention" else None

    def biases_of(self, g: Graph):
        return False, False, False

    def refuse_windows(self, g: Graph) -> str | None:
        return one_window_size(g, self.architecture)

    def own_config(self, g: Graph) -> dict:
        windows = layer_types_config(g)
        return {"sliding_window": windows["sliding_window"] or DEFAULT_WINDOW, "layer_types": windows["layer_types"]}

    def tiny_config(self, o):
        return {**super().tiny_config(o), "sliding_window": o["window"] or DEFAULT_WINDOW,
                "layer_types": ["sliding_attention" if (i + 1) % o["pattern"] and o["window"] else "full_attention"
                                for i in range(o["layers"])]}


FAMILY = Ministral()
