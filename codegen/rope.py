"""The rotary-embedding settings templates/rope.py.j2 bakes in, for each rope type.

The scalar arithmetic transformers does in Python before it touches a tensor (modeling_rope_utils: yarn's
correction range and mscale, longrope's attention factor, llama3's wavelength bounds) is done here, with
the same expressions, so the generated module holds its results as literals and runs only the tensor part.
"""
from __future__ import annotations

import math

from compose.errors import BuildError
from compose.ir.config import ArchConfig


def yarn(cfg: ArchConfig, dim: int) -> dict:
    """YaRN's scalars as transformers computes them (the GGUF writer uses them too)."""
    r = cfg.rope
    original = r.original_max_positions
    factor = r.factor if r.factor is not None else cfg.max_positions / original

    def get_mscale(scale, mscale=1):
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = r.attention_factor
    if attention_factor is None:
        if r.mscale and r.mscale_all_dim:
            attention_factor = float(get_mscale(factor, r.mscale) / get_mscale(factor, r.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = r.beta_fast or 32, r.beta_slow or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if r.truncate is None or r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    return {"rope_factor": factor, "rope_attention_factor": attention_factor, "rope_ramp_low": low,
            "rope_ramp_span": high - low}


def _longrope(cfg: ArchConfig, dim: int) -> dict:
    r = cfg.rope
    original = r.original_max_positions
    factor = r.factor if r.factor is not None else cfg.max_positions / original
    attention_factor = r.attention_factor
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    for name in ("short_factor", "long_factor"):
        if len(getattr(r, name)) != dim // 2:
            raise BuildError(f"rope_parameters.{name} has {len(getattr(r, name))} values; {dim} rotating "
                             f"dimensions need {dim // 2}")
    return {"rope_attention_factor": attention_factor, "rope_original": original,
            "rope_short_factor": r.short_factor, "rope_long_factor": r.long_factor}


def rope_attrs(cfg: ArchConfig) -> dict:
    """The template variables of cfg's rope: its type and the literals that type needs."""
    r = cfg.rope
    partial = r.partial_rotary_factor not in (None, 1.0)
    # transformers rotates the first int(head_dim * factor) dimensions and computes the frequencies over them.
    dim = int(cfg.head_dim * r.partial_rotary_factor) if partial else cfg.head_dim
    if dim % 2 or not 0 < dim <= cfg.head_dim:
        raise BuildError(f"rotary positions need an even number of rotating dimensions, got {dim} (head_dim "
                         f"{cfg.head_dim}, partial_rotary_factor {r.partial_rotary_factor})")
    out = {"rope_type": r.type, "rope_theta": r.theta, "rope_attention_factor": 1.0,
           "rotary_dim": dim if partial else None}
    if r.type in ("linear", "dynamic"):
        out["rope_factor"] = r.factor
        out["rope_max_positions"] = cfg.max_positions
    elif r.type == "llama3":
        original = r.original_max_positions
        out.update(rope_factor=r.factor, rope_low_freq_factor=r.low_freq_factor,
                   rope_high_freq_factor=r.high_freq_factor, rope_original=original,
                   rope_low_freq_wavelen=original / r.low_freq_factor,
                   rope_high_freq_wavelen=original / r.high_freq_factor,
                   rope_smooth_span=r.high_freq_factor - r.low_freq_factor)
    elif r.type == "yarn":
        out.update(yarn(cfg, dim))
    elif r.type == "longrope":
        out.update(_longrope(cfg, dim))
    elif r.type != "default":
        raise BuildError(f"the torch backend has no rope_type {r.type!r}")
    return {k: repr(v) if isinstance(v, float) else v for k, v in out.items()}
