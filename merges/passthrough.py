"""Passthrough: the one input tensor unchanged, or multiplied by its `scale` (mergekit 0.1.5's
"passthrough"; https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md). Frankenmerges
stack layers with it, and a scale of 0 zeroes a projection (as in depth up-scaling recipes).

Without a scale the input itself is returned, not a copy.
"""
from __future__ import annotations

from compose.merges.api import Method, Param


def passthrough(tensors, base, *, seed=None, name="", scale=None):
    if len(tensors) != 1:
        raise ValueError(f"passthrough takes exactly one model; got {len(tensors)}"
                         f"{' (the base model counts as one)' if base is not None and len(tensors) > 1 else ''}")
    if isinstance(scale, (list, tuple)):
        if len(scale) != 1:
            raise ValueError(f"passthrough: scale needs one value per input (1), got {len(scale)}")
        scale = scale[0]
    x = tensors[0]
    return x if scale is None else x * float(scale)


METHODS = [Method("passthrough", passthrough, base="ignored", params=(Param("scale", "input", None),),
                  min_inputs=1, max_inputs=1,
                  reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md")]
