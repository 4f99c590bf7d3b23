"""NearSwap: take the other model's value wherever it is close to the base's, and move only partly
towards it where the two differ more (alchemonaut,
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001; mergekit 0.1.5's "nearswap").

With B the base and M the other model, elementwise:

    w   = clamp(t / max(|B - M|, 1e-6), 0, 1)      # 1 where |B - M| <= t, t / |B - M| beyond
    out = w * M + (1 - w) * B

so t <= 0 returns the base and t at least the largest difference returns M. Computed in the inputs' dtype.
"""
from __future__ import annotations

from compose.merges.api import Method, Param


def nearswap(tensors, base, *, seed=None, name="", t):
    if len(tensors) != 2 or base is None:
        raise ValueError(f"nearswap takes a base model and exactly one other model; got {len(tensors)} "
                         f"input(s){' and no base' if base is None else ''}")
    a, b = tensors[base], tensors[1 - base]
    w = (float(t) / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return w * b + (1 - w) * a


METHODS = [Method("nearswap", nearswap, base="required", params=(Param("t", "shared"),), min_inputs=2, max_inputs=2,
                  reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001")]
