"""Multi-SLERP: a weighted mean of any number of models on the hypersphere, optionally of their task
vectors relative to a base (Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea), as
mergekit 0.1.5 computes it.

With x_i the non-base models flattened (minus the base B, if there is one) and weights w_i (divided by
their sum when normalize_weights):

    u_i = x_i / (|x_i| + eps)                      # onto the unit sphere
    m   = sum_i w_i u_i,  m /= |m|                 # the weighted Euclidean mean, projected back
    v   = sum_i w_i (u_i - <u_i, m> m)             # the inputs in m's tangent space, averaged
    r   = m cos|v| + v sin|v| / |v|                # exponential map back to the sphere (|v| + eps)
    out = r * sum_i w_i |x_i|  (+ B)

A single non-base model is returned as it is. When |m| < eps (antipodal inputs that cancel) two models
are averaged linearly, and more are refused. Computed in the inputs' dtype.
"""
from __future__ import annotations

from compose.merges.api import Method, Param


def multislerp(tensors, base, *, seed=None, name="", weight, normalize_weights=True, eps=1e-8):
    import torch

    others = [x for i, x in enumerate(tensors) if i != base]
    if not others:
        raise ValueError("multislerp needs at least one model besides the base")
    weights = [float(w) for w in ([weight] * len(others) if isinstance(weight, (int, float)) else weight)]
    if len(weights) != len(others):
        raise ValueError(f"multislerp: weight needs one value per non-base model ({len(others)}), "
                         f"got {len(weights)}")
    if len(others) == 1:
        return others[0]
    if normalize_weights and sum(weights) == 0:
        raise ValueError(f"multislerp: the weights {weights} sum to 0 and cannot be normalized "
                         "(set normalize_weights: false or change them)")
    b = tensors[base] if base is not None else None
    xs = torch.stack(others)
    if b is not None:
        xs -= b
    flat = xs.view(xs.shape[0], -1)                                  # (n, numel)
    w = torch.tensor(weights, dtype=xs.dtype, device=xs.device)
    if normalize_weights:
        w = w / w.sum()

    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)     # (n, 1)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise ValueError("multislerp: the weighted mean of the inputs' directions is zero (antipodal "
                             "inputs whose weights balance out); change the weights")
        out = (xs[0] * w[0] + xs[1] * w[1]).view(xs.shape[1:])
        return out + b if b is not None else out
    mean = mean / mean_norm

    tangent = units - (units * mean).sum(-1, keepdim=True) * mean   # (n, numel)
    tangent = (tangent * w.view(-1, 1)).sum(0)
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    out = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(xs.shape[1:])
    return out + b if b is not None else out


METHODS = [Method("multislerp", multislerp, base="optional",
                  params=(Param("weight", "non_base"), Param("normalize_weights", "shared", True, bool),
                          Param("eps", "shared", 1e-8)),
                  min_inputs=1, reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")]
