"""config.json's rotary parameters -> the typed `Rope`, with transformers' own reading rules.

transformers 5 keeps them in `rope_parameters`; 4.x checkpoints have `rope_theta` and a `rope_scaling` dict
(whose type may be spelled `type`). As transformers' standardize_rope_params does: `rope_parameters` wins
over `rope_scaling`, a theta inside the dict over the top-level `rope_theta`, else the family's default
theta; llama3, yarn and longrope take `original_max_position_embeddings` from the top level when it is
there (Phi-3 keeps it there), else from the dict, else max_position_embeddings.
"""
from __future__ import annotations

import math

from compose.errors import SourceError
from compose.ir.config import ROPE_TYPES, Rope

_NUMBERS = {"factor": "factor", "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
            "beta_fast": "beta_fast", "beta_slow": "beta_slow", "attention_factor": "attention_factor",
            "mscale": "mscale", "mscale_all_dim": "mscale_all_dim", "partial_rotary_factor": "partial_rotary_factor"}
_LISTS = ("short_factor", "long_factor")
_REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
             "yarn": (), "longrope": ("short_factor", "long_factor")}
_ALLOWED = {"default": (), "linear": ("factor",), "dynamic": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
            "yarn": ("factor", "beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"),
            "longrope": ("factor", "attention_factor", "short_factor", "long_factor")}
_WITH_ORIGINAL = ("llama3", "yarn", "longrope")


def _number(v, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SourceError(f"{where}: must be a finite number, got {v!r}")
    return float(v)


def read_rope(c: dict, default_theta: float, where: str) -> Rope:
    """The Rope of config.json `c` (`where` names the file in errors)."""
    raw = c.get("rope_parameters") or c.get("rope_scaling") or {}
    field = "rope_parameters" if c.get("rope_parameters") else "rope_scaling"
    if not isinstance(raw, dict):
        raise SourceError(f"{where}: {field} must be an object, got {type(raw).__name__}")
    p = dict(raw)
    if any(isinstance(v, dict) for v in p.values()):
        nested = ", ".join(k for k, v in p.items() if isinstance(v, dict))
        raise SourceError(f"{where}: {field} per layer type ({nested}) is not supported yet")
    legacy_type = p.pop("type", None)
    rope_type = p.pop("rope_type", None) or legacy_type or "default"
    if rope_type not in ROPE_TYPES:
        raise SourceError(f"{where}: {field}.rope_type {rope_type!r} is not supported "
                          f"(supported: {', '.join(ROPE_TYPES)})")
    theta = p.pop("rope_theta", None)
    theta = _number(c["rope_theta"] if theta is None and c.get("rope_theta") is not None else
                    (default_theta if theta is None else theta), f"{where}: rope_theta")
    if theta <= 0:
        raise SourceError(f"{where}: rope_theta must be positive, got {theta}")
    out: dict = {"type": rope_type, "theta": theta}
    partial = p.pop("partial_rotary_factor", None)
    partial = c.get("partial_rotary_factor") if partial is None else partial
    if partial is not None:
        out["partial_rotary_factor"] = _number(partial, f"{where}: partial_rotary_factor")
    original = p.pop("original_max_position_embeddings", None)
    if rope_type in _WITH_ORIGINAL:
        top = c.get("original_max_position_embeddings")
        original = top if top is not None else original if original is not None else c.get("max_position_embeddings")
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise SourceError(f"{where}: {field}.original_max_position_embeddings must be a positive integer, "
                              f"got {original!r}")
        out["original_max_positions"] = original
    unknown = sorted(set(p) - set(_ALLOWED[rope_type]))
    if unknown:
        raise SourceError(f"{where}: {field} has {', '.join(unknown)}, which compose does not know for rope_type "
                          f"{rope_type!r} (it reads {', '.join(_ALLOWED[rope_type]) or 'only rope_theta'})")
    missing = [k for k in _REQUIRED.get(rope_type, ()) if p.get(k) is None]
    if missing:
        raise SourceError(f"{where}: {field} with rope_type {rope_type!r} needs {', '.join(missing)}")
    for k, v in p.items():
        if v is None:
            continue
        if k in _LISTS:
            if not isinstance(v, list) or not v:
                raise SourceError(f"{where}: {field}.{k} must be a non-empty list of numbers")
            out[k] = tuple(_number(x, f"{where}: {field}.{k}") for x in v)
        elif k == "truncate":
            if not isinstance(v, bool):
                raise SourceError(f"{where}: {field}.truncate must be true or false, got {v!r}")
            out[k] = v
        else:
            out[_NUMBERS[k]] = _number(v, f"{where}: {field}.{k}")
    return Rope(**out)


def legacy_rope(rope: Rope, max_positions: int) -> dict:
    """transformers 4.x's config.json keys for `rope`, written next to `rope_parameters`: `rope_theta`,
    `partial_rotary_factor` when set, and `rope_scaling` unless the rope is `default`.

    transformers 5 reads them too (its config classes take `rope_scaling` over `rope_parameters` when both
    are there), so they must say exactly what rope_parameters says, in the form from which 4.x computes the
    same frequencies and cos/sin scale:
    - yarn: 4.x requires `factor`; 5 derives a missing one as max_position_embeddings / the original context;
    - longrope: 4.x reads the original context only at the top level and always derives the factor from
      it, so that context goes to the top level, and the attention factor 5 would derive from a `factor`
      of its own is written out.
    """
    out: dict = {"rope_theta": rope.theta}
    if rope.partial_rotary_factor is not None:
        out["partial_rotary_factor"] = rope.partial_rotary_factor
    if rope.type == "default":
        return out
    scaling = {k: v for k, v in rope.to_json().items() if k not in ("rope_theta", "partial_rotary_factor")}
    original = rope.original_max_positions
    if rope.type == "yarn" and rope.factor is None:
        scaling["factor"] = max_positions / original
    if rope.type == "longrope":
        out["original_max_position_embeddings"] = scaling.pop("original_max_position_embeddings")
        derived = max_positions / original
        if rope.attention_factor is None and rope.factor is not None and rope.factor != derived:
            scaling["attention_factor"] = (1.0 if rope.factor <= 1.0 else
                                           math.sqrt(1 + math.log(rope.factor) / math.log(original)))
    out["rope_scaling"] = scaling
    return out
