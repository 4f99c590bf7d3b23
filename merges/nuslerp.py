"""NuSLERP: SLERP between two models weighted like a linear merge, optionally of their task vectors
relative to a base, and optionally row by row (mergekit 0.1.5's "nuslerp";
https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md).

With M0, M1 the two non-base models (in input order) and weights w0, w1:

    t = w1 / (w0 + w1)          (0.5 when |w0 + w1| < 1e-6)
    no base:   out = slerp(t, M0, M1)
    base B:    out = B + slerp(t, M0 - B, M1 - B)

where slerp interpolates vectors: the whole tensor flattened (nuslerp_flatten, the default), or else one
vector per slice along the last dim, or along dim 0 with nuslerp_row_wise. For each vector pair:

    cos(theta) = <v0 / max(|v0|, 1e-7), v1 / max(|v1|, 1e-7)>     (clamped to [-1, 1])
    slerp = (sin((1 - t) theta) v0 + sin(t theta) v1) / sin(theta)
    slerp = (1 - t) v0 + t v1                          when 1 - cos^2 <= 1e-16 (colinear)

Computed in the inputs' dtype, as mergekit does.
"""
from __future__ import annotations

from compose.merges.api import Method, Param

EPS = 1e-8


def _normalize(x):
    import torch

    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def spherical(t: float, v0, v1, row_wise: bool, flatten: bool):
    """slerp(t, v0, v1) over the vectors chosen by row_wise / flatten (see the module docstring)."""
    import torch

    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)           # vectors along dim 0
    cos = (_normalize(v0) * _normalize(v1)).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= EPS ** 2
    theta = torch.acos(torch.where(colinear, 0, cos))               # keeps the unused branch finite
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(tensors, base, *, seed=None, name="", weight, nuslerp_row_wise=False, nuslerp_flatten=True):
    others = [x for i, x in enumerate(tensors) if i != base]
    if len(others) != 2:
        raise ValueError(f"nuslerp interpolates exactly two models besides the base; got {len(others)}")
    weights = [float(w) for w in ([weight] * 2 if isinstance(weight, (int, float)) else weight)]
    if len(weights) != 2:
        raise ValueError(f"nuslerp: weight needs one value per non-base model (2), got {len(weights)}")
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    if base is None:
        return spherical(t, others[0], others[1], nuslerp_row_wise, nuslerp_flatten)
    b = tensors[base]
    return b + spherical(t, others[0] - b, others[1] - b, nuslerp_row_wise, nuslerp_flatten)


METHODS = [Method("nuslerp", nuslerp, base="optional",
                  params=(Param("weight", "non_base"), Param("nuslerp_row_wise", "shared", False, bool),
                          Param("nuslerp_flatten", "shared", True, bool)),
                  min_inputs=2, max_inputs=3,
                  reference="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md")]
