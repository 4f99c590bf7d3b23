"""Gemma 3 (text; config.json model_type `gemma3_text`, as Gemma 3 1B and text-only fine-tunes save): Gemma 2's
block plus an RMSNorm (Gemma's 1 + w) over each query and key head before rope, with these changes:

- no attention soft-cap (transformers' Gemma3Attention passes none, whatever config.json says);
- five sliding layers for every global one by default (`sliding_window_pattern`);
- two ropes. Global layers take `rope_parameters.full_attention` (theta 1e6, often linear scaling),
  sliding layers take `rope_parameters.sliding_attention` (theta 1e4). transformers 4.x configs say
  `rope_theta`, `rope_local_base_freq` and `rope_scaling` (the global one's) instead.

The multimodal `gemma3` checkpoints (Gemma3ForConditionalGeneration) keep this model under another prefix
with a vision tower; they are refused by model_type for now.
"""
from __future__ import annotations

from compose.errors import SourceError
from compose.families.base import LAYER_TYPES
from compose.families.gemma2 import Gemma2
from compose.families.rope import legacy_rope, read_rope
from compose.ir.graph import Graph


class Gemma3(Gemma2):
    model_type = "gemma3_text"
    architecture = "Gemma3ForCausalLM"
    dense = "gemma3_text"
    gguf_arch = "gemma3"
    qk_norm = True
    default_max_positions = 131072
    default_theta = 1_000_000.0
    keys = Gemma2.keys + ("rope_local_base_freq",)
    tiny_name = "gemma3"
    tiny_options = {"tie": 1, "window": 16, "pattern": 6}
    sliding_pattern = 6
    default_softcaps = (None, None)

    def attention_config(self, c, where):
        out = super().attention_config(c, where)
        out["attn_softcap"] = None
        out["local_rope"] = self._ropes(c, where)[1]
        return out

    def rope(self, c, where):
        return self._ropes(c, where)[0]

    def _ropes(self, c: dict, where: str):
        """(global rope, local rope), read as transformers' Gemma3TextConfig reads them."""
        params = c.get("rope_parameters")
        top = {k: c[k] for k in ("max_position_embeddings", "original_max_position_embeddings",
                                 "partial_rotary_factor") if k in c}
        if params is not None:
            if not isinstance(params, dict) or not set(params) <= set(LAYER_TYPES):
                raise SourceError(f"{where}: config.json rope_parameters must map full_attention and "
                                  "sliding_attention to their rope parameters")
            full, local = params.get("full_attention"), params.get("sliding_attention")
            return (read_rope({**top, "rope_theta": c.get("rope_theta"), "rope_parameters": full or {}},
                              self.default_theta, f"{where}: rope_parameters.full_attention"),
                    read_rope({**top, "rope_theta": c.get("rope_local_base_freq"), "rope_parameters": local or {}},
                              10000.0, f"{where}: rope_parameters.sliding_attention"))
        return (read_rope({**top, "rope_theta": c.get("rope_theta"), "rope_scaling": c.get("rope_scaling")},
                          self.default_theta, where),
                read_rope({**top, "rope_theta": c.get("rope_local_base_freq")}, 10000.0,
                          f"{where}: rope_local_base_freq"))

    def own_config(self, g: Graph) -> dict:
        out = super().own_config(g)
        del out["attn_logit_softcapping"]  # Gemma3TextConfig has one, but its attention never reads it
        return out

    def rope_config(self, g: Graph) -> dict:
        # 4.x's keys: the global rope's theta and scaling, and the local theta (4.x's local rope is always
        # unscaled: a scaled one only transformers 5 reads).
        c = g.config
        local = c.local_rope or c.rope
        legacy = legacy_rope(c.rope, c.max_positions)
        return {"rope_parameters": {"full_attention": c.rope.to_json(), "sliding_attention": local.to_json()},
                **legacy, "rope_local_base_freq": local.theta}

    def tiny_config(self, o):
        base = super().tiny_config(o)
        return {**base, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}}


FAMILY = Gemma3()
