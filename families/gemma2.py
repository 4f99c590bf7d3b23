"""Gemma 2: Llama's attention and gated MLP with Gemma's differences, each as transformers computes it.

- RMSNorm as x / rms(x) * (1 + w), all in float32 (its weights sit near 0, not 1);
- the embeddings multiplied by sqrt(hidden), that number rounded to the model's dtype first;
- four norms per block: the attention's and the FFN's inputs and outputs (`post_attention_layernorm`
  normalises the attention's output; `pre_feedforward_layernorm` is the FFN's input norm);
- attention scores scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5;
- attention scores and final logits soft-capped, cap * tanh(x / cap);
- sliding-window and global layers alternating, as `layer_types` says (else every other one slides);
- gelu_pytorch_tanh (`hidden_activation`), biases only behind `attention_bias`, a tied head.
"""
from __future__ import annotations

import math

from compose.errors import SourceError
from compose.families.base import (Family, Features, int_field, layer_types, layer_types_config,
                                   one_window_size)
from compose.families.llama import flag
from compose.ir.graph import Graph


def positive_number(c: dict, key: str, default: float | None, where: str) -> float | None:
    """A positive finite number, kept as written (transformers' config classes check int and float
    fields by type); absent: `default`; null: None (a soft-cap that is off)."""
    v = c[key] if key in c else default
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise SourceError(f"{where}: config.json {key} must be a positive number or null, got {v!r}")
    return v


class Gemma2(Family):
    model_type = "gemma2"
    architecture = "Gemma2ForCausalLM"
    dense = "gemma2"
    gguf_arch = "gemma2"
    features = Features(norm="offset_rms", embed_scale=True)
    sandwich = True
    act_key = "hidden_activation"
    default_act = "gelu_pytorch_tanh"
    default_max_positions = 8192
    keys = ("attention_bias", "query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping",
            "sliding_window", "layer_types", "sliding_window_pattern", "use_bidirectional_attention", "hidden_act",
            "cache_implementation")
    # Gemma 2 ties its embeddings; the tiny one slides over 16 tokens in every other layer (`pattern`: every
    # pattern-th layer is global).
    tiny_options = {"tie": 1, "window": 16, "pattern": 2}
    sliding_pattern = 2
    """Without layer_types, every sliding_pattern-th layer is global and the others slide."""
    default_softcaps = (50.0, 30.0)
    """transformers' defaults for (attn_logit_softcapping, final_logit_softcapping)."""

    def biases(self, c, where):
        attention = flag(c, "attention_bias", where)
        return attention, attention, False

    def biases_of(self, g: Graph):
        return g.config.qkv_bias, g.config.qkv_bias, False

    def attention_config(self, c, where):
        if c.get("use_bidirectional_attention"):
            raise SourceError(f"{where}: config.json use_bidirectional_attention: a bidirectional encoder, not a "
                              "causal language model; compose composes causal models only")
        attn, final = self.default_softcaps
        return {"query_scale": positive_number(c, "query_pre_attn_scalar", 256, where),
                "attn_softcap": positive_number(c, "attn_logit_softcapping", attn, where),
                "final_softcap": positive_number(c, "final_logit_softcapping", final, where)}

    def window(self, c, i, where):
        types = layer_types(c, where)
        if types is None:
            sliding = bool((i + 1) % int_field(c, "sliding_window_pattern", where, default=self.sliding_pattern))
        else:
            sliding = types[i] == "sliding_attention"
        return int_field(c, "sliding_window", where, default=4096) if sliding else None

    def refuse_windows(self, g: Graph) -> str | None:
        return one_window_size(g, self.architecture)

    def own_config(self, g: Graph) -> dict:
        c = g.config
        windows = layer_types_config(g)
        return {"attention_bias": c.qkv_bias, "query_pre_attn_scalar": c.query_scale,
                "attn_logit_softcapping": c.attn_softcap, "final_logit_softcapping": c.final_softcap,
                # Without a sliding layer the size is unused; transformers still builds a sliding mask from it.
                "sliding_window": windows["sliding_window"] or 4096, "layer_types": windows["layer_types"]}

    def tiny_config(self, o):
        base = super().tiny_config(o)
        del base["hidden_act"]
        hd = base["head_dim"]
        return {**base, "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
                "query_pre_attn_scalar": hd, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "sliding_window": o["window"] or 4096, "pad_token_id": 0,
                "layer_types": ["sliding_attention" if (i + 1) % o["pattern"] and o["window"]
                                else "full_attention" for i in range(o["layers"])]}


FAMILY = Gemma2()
