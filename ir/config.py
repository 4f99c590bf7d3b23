"""Model-wide hyper-parameters, typed: what a family module reads out of config.json (compose.families).

Every field the math depends on has a type here, rope parameters included; the fields compose does not
interpret are kept, untouched, in `ArchConfig.extra` and written back to the output, never read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields

DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
"""The dtypes compose writes."""

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


@dataclass(frozen=True)
class Rope:
    """Rotary position embedding parameters, as transformers' `rope_parameters` names them (see
    transformers' modeling_rope_utils): `type` picks how the inverse frequencies are computed.

    - default: theta ** (-2i / head_dim);
    - linear: those divided by `factor`;
    - dynamic: NTK scaling, theta grown with the sequence once it passes max_position_embeddings;
    - llama3: low frequencies divided by `factor`, a smooth ramp between `low_freq_factor` and
      `high_freq_factor` wavelengths of `original_max_positions`;
    - yarn: interpolation and extrapolation blended over a ramp set by `beta_fast`/`beta_slow`, cos and
      sin scaled by `attention_factor`;
    - longrope: per-frequency `short_factor`s, or `long_factor`s once the sequence passes
      `original_max_positions`, cos and sin scaled by `attention_factor`.
    """

    type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    original_max_positions: int | None = None
    """transformers' original_max_position_embeddings: the pre-training context (llama3, yarn, longrope)."""
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    partial_rotary_factor: float | None = None
    """The share of each head's dimensions that rotate (None: all of them)."""

    _JSON = {"type": "rope_type", "theta": "rope_theta", "original_max_positions": "original_max_position_embeddings"}

    def to_json(self) -> dict:
        """transformers' `rope_parameters` dict: the set fields under their config.json names."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None:
                out[self._JSON.get(f.name, f.name)] = list(v) if isinstance(v, tuple) else v
        return out

    def describe(self) -> str:
        """`llama3(theta=500000.0, factor=8.0, ...)`; factor lists are summarised by length."""
        parts = []
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name != "type" and v is not None:
                parts.append(f"{f.name}=[{len(v)} values]" if isinstance(v, tuple) else f"{f.name}={v!r}")
        return f"{self.type}({', '.join(parts)})"


@dataclass(frozen=True)
class ArchConfig:
    """The hyper-parameters every block of one model shares, typed (compose.families reads them)."""

    family: str
    """The registry name of the family whose attention, norms and embeddings these are (an MoE
    checkpoint's are those of its dense family: Mixtral's are Mistral's)."""
    vocab: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    rope: Rope
    max_positions: int
    tie_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    act: str
    dtype: str
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    query_scale: float | None = None
    """Attention scores are scaled by query_scale ** -0.5 (Gemma's query_pre_attn_scalar); None: head_dim."""
    attn_softcap: float | None = None
    """Attention scores soft-capped as cap * tanh(score / cap) before the mask (Gemma 2); None: not capped."""
    final_softcap: float | None = None
    """Logits soft-capped as cap * tanh(logit / cap) (Gemma 2 and 3); None: not capped."""
    local_rope: Rope | None = None
    """The rope of sliding-window layers when it differs from the others' (Gemma 3's local base
    frequency); None: every layer has `rope`."""
    source: str | None = None
    """A derived family's (compose.families.derived) source config.json, as JSON text: its output's
    config.json is this one with the layer count and per-layer fields rewritten. None for hand-written ones."""
    extra: tuple[tuple[str, str], ...] = ()
    """config.json fields compose does not interpret, as sorted (key, JSON text) pairs: carried into the
    output's config.json as they are, never read back."""

    def carried(self) -> dict:
        """The uninterpreted fields, decoded: what a family writes next to its typed fields."""
        return {k: json.loads(v) for k, v in self.extra}

    def token_ids(self) -> dict:
        """bos/eos/pad token ids under their config.json names (the unset ones left out)."""
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        ids = {"bos_token_id": self.bos_token_id, "eos_token_id": eos, "pad_token_id": self.pad_token_id}
        return {k: v for k, v in ids.items() if v is not None}

    def describe(self) -> str:
        if self.source is not None:  # a derived family's: the rest is its class's, read from config.json
            return f"family={self.family} (derived) hidden={self.hidden} vocab={self.vocab} dtype={self.dtype}"
        rope = "" if self.rope.type == "default" and self.local_rope is None else f" rope={self.rope.describe()}"
        if self.local_rope is not None:
            rope += f" local_rope={self.local_rope.describe()}"
        extra = "".join(f" {k}={getattr(self, k)}" for k in ("query_scale", "attn_softcap", "final_softcap")
                        if getattr(self, k) is not None)
        return (f"family={self.family} hidden={self.hidden} intermediate={self.intermediate} "
                f"heads={self.heads} kv_heads={self.kv_heads} head_dim={self.head_dim} vocab={self.vocab} "
                f"tied={self.tie_embeddings} dtype={self.dtype}{rope}{extra}")
