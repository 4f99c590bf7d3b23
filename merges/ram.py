"""RAM, Reinforced Agent Merging, and its tensor-local variant RAM+ (https://arxiv.org/abs/2601.13572),
as mergekit 0.1.5 computes them (`ram`, `ramplus_tl`).

With B the base and T_i = M_i - B, an entry of T_i *contributes* when |T_i| > epsilon. Per entry, c = the
number of contributing models:

    ram:         out = B + sum_i [contributes_i] * (T_i if c == 1 else T_i / c)

i.e. an update only one model made is taken whole, updates several models made are averaged, and entries
no model changed stay at the base. `ramplus_tl` scales each model's unique updates (c == 1) up by

    lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha)

where shared_i / unique_i count model i's contributing entries with c > 1 / c == 1 in this tensor (the
"tensor-local" form of the paper's per-model ratio). No per-model weights and nothing random.

Output dtype: `ram` keeps the input dtype. `ramplus_tl` returns torch.promote_types(dtype, float32),
float32 for bfloat16/float16 inputs, because mergekit multiplies by lambda_i held in float32 and does not
cast back; we return the same so results match (a caller wanting the input dtype casts afterwards).
"""
from __future__ import annotations

from compose.merges.api import Method, Param


def _task_vectors(method: str, tensors, base, epsilon: float):
    """(base, T flattened (n, numel), contributes (n, numel) bool, c (1, numel) int64), or (base, None...)."""
    import torch

    if base is None:
        raise ValueError(f"{method} needs a base model (base_model)")
    b = tensors[base]
    models = [t for i, t in enumerate(tensors) if i != base]
    if not models:
        return b, None, None, None
    tv = torch.stack([m - b for m in models], dim=0).view(len(models), -1)
    contributes = tv.abs() > epsilon
    counts = contributes.sum(dim=0, keepdim=True)
    return b, tv, contributes, counts


def ram(tensors, base, *, seed=None, name="", epsilon=1e-5):
    b, tv, contributes, counts = _task_vectors("ram", tensors, base, epsilon)
    if tv is None:
        return b.clone()
    tv = tv * contributes
    merged = (tv * (counts == 1) + tv * (counts > 1) / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)


def ramplus_tl(tensors, base, *, seed=None, name="", r=0.1, alpha=0.2, epsilon=1e-5):
    b, tv, contributes, counts = _task_vectors("ramplus_tl", tensors, base, epsilon)
    if tv is None:
        return b.clone()
    unique, overlap = counts == 1, counts > 1                            # (1, numel)
    shared_n = (contributes & overlap).sum(dim=1)                        # (n,) int64
    unique_n = (contributes & unique).sum(dim=1)
    rho = shared_n / unique_n.clamp(min=epsilon)                         # float32: clamp to a float bound
    lam = 1 + r * rho.clamp(min=0, max=alpha)                            # (n,) float32
    tv = tv * contributes
    merged = (tv * unique * lam.unsqueeze(-1) + tv * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return b + merged.reshape_as(b)


METHODS = [
    Method("ram", ram, base="required", params=(Param("epsilon", "shared", 1e-5),),
           reference="https://arxiv.org/abs/2601.13572"),
    Method("ramplus_tl", ramplus_tl, base="required",
           params=(Param("r", "shared", 0.1), Param("alpha", "shared", 0.2), Param("epsilon", "shared", 1e-5)),
           reference="https://arxiv.org/abs/2601.13572"),
]
