"""Arcee Fusion: keep the base model and take the other model's value only where it changed most, scored
by magnitude of change times the divergence of the rows' softmax distributions (Arcee AI,
https://arcee.ai; mergekit 0.1.5's "arcee_fusion").

With B the base and M the other model:

    p = softmax(M) + 1e-8,  q = softmax(B) + 1e-8        # along the last dim: per row of a matrix
    importance = |M - B| * KL(p || q)                     # KL = sum(p log(p / q)) per row
    threshold  = Q2 + 1.5 (Q3 - Q1)                       # quartiles of importance over the whole tensor
    out = B + (M - B) * [importance >= threshold]

A quartile Qx is the element at index floor(x (n - 1)) of the sorted importances. The mask is float32,
so half-precision inputs give a float32 result, as in mergekit.

One deliberate difference: for tensors of more than 2**20 elements mergekit estimates the quartiles from
2**20 elements drawn at random with replacement from torch's global generator, so its result is neither
reproducible nor seeded. Here the quartiles are always the exact ones (the value the sample estimates),
which keeps the method deterministic; the two masks then differ only for elements within the sampling
error of the threshold.
"""
from __future__ import annotations

from compose.merges.api import Method

SAMPLE = 1_000_000
"""mergekit samples the importances of tensors larger than this; we take exact quartiles instead."""


def quartile_threshold(importance):
    """Q2 + 1.5 (Q3 - Q1) of all elements, with Qx the element at sorted index floor(x (n - 1))."""
    import torch

    flat = importance.reshape(-1)
    last = flat.numel() - 1
    ranks = [last // 4, last // 2, 3 * last // 4]                  # = int(x * (n - 1)), exact for any n
    if flat.numel() <= SAMPLE:
        ordered = torch.sort(flat).values
        q1, q2, q3 = (ordered[r] for r in ranks)
    else:                                                           # a selection, not a full sort: less memory
        q1, q2, q3 = (torch.kthvalue(flat, r + 1).values for r in ranks)
    return q2 + 1.5 * (q3 - q1)


def importance_scores(model, base):
    import torch

    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (model - base).abs() * kl


def arcee_fusion(tensors, base, *, seed=None, name=""):
    if len(tensors) != 2 or base is None:
        raise ValueError(f"arcee_fusion takes a base model and exactly one other model; got {len(tensors)} "
                         f"input(s){' and no base' if base is None else ''}")
    b, m = tensors[base], tensors[1 - base]
    if b.numel() == 0:
        return b.clone()
    importance = importance_scores(m, b)
    mask = (importance >= quartile_threshold(importance)).float()
    return b + (m - b) * mask


METHODS = [Method("arcee_fusion", arcee_fusion, base="required", min_inputs=2, max_inputs=2,
                  reference="https://arcee.ai")]
