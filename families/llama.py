"""Llama (1, 2, 3.x; and what saves as model_type `llama`): q/k/v/o biases behind `attention_bias`, MLP
biases behind `mlp_bias`, no sliding window; rope of any type (Llama 3.1+ ships `llama3`)."""
from __future__ import annotations

from compose.errors import SourceError
from compose.families.base import Family
from compose.ir.graph import Graph


def flag(c: dict, key: str, where: str) -> bool:
    """A true/false config.json field (absent: false)."""
    v = c.get(key, False)
    if not isinstance(v, bool):
        raise SourceError(f"{where}: config.json {key} must be true or false, got {v!r}")
    return v


class Llama(Family):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    dense = "llama"
    moe_targets = ("mixtral", "qwen2_moe")
    gguf_arch = "llama"
    mergekit_moe = frozenset({"Mixtral", "DeepSeek MoE", "Qwen MoE"})
    keys = ("attention_bias", "mlp_bias")
    tiny_options = {"tie": 0}

    def biases(self, c, where):
        attention = flag(c, "attention_bias", where)
        return attention, attention, flag(c, "mlp_bias", where)

    def biases_of(self, g: Graph):
        c = g.config
        return c.qkv_bias, c.qkv_bias, c.mlp_bias

    def own_config(self, g: Graph) -> dict:
        return {"attention_bias": g.config.qkv_bias, "mlp_bias": g.config.mlp_bias}

    def tiny_config(self, o):
        return {**super().tiny_config(o), "attention_bias": False, "mlp_bias": False}


FAMILY = Llama()
