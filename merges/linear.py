"""Linear merge (model soups, Wortsman et al. 2022; SPHINX's beta-mix is this with weights beta, 1-beta):
sum_i w_i * x_i, divided by sum_i w_i when `normalize` (the default)."""
from __future__ import annotations

from compose.merges.api import Method, Param


def linear(tensors, base, *, seed=None, name="", weight, normalize=True):
    import torch

    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(first, dtype=dtype)
    for t, w in zip(tensors, weight):
        out.add_(t.to(dtype), alpha=float(w))
    if normalize:
        total = sum(float(w) for w in weight)
        if total == 0:
            raise ValueError(f"the weights {[float(w) for w in weight]} sum to 0 and cannot be normalized "
                             "(set normalize: false or change them)")
        out.div_(total)
    return out.to(first.dtype)


METHODS = [Method("linear", linear, base="ignored",
                  params=(Param("weight", "input"), Param("normalize", "shared", True, bool)),
                  reference="https://arxiv.org/abs/2203.05482")]
