"""SCE merging: Select, Calculate, Erase (Wan et al., FuseChat-2.0, https://arxiv.org/abs/2408.07990),
as mergekit 0.1.5 computes it. With B the base and T_i = M_i - B the task vectors of the other models:

    Select     with select_topk < 1, keep the int(nonzero * select_topk) entries whose variance across
               the T_i (population variance, over the models) is largest, where nonzero counts entries
               with non-zero variance; zero the rest in every T_i.
    Calculate  one weight per model: w_i = mean(T_i^2) / sum_j mean(T_j^2)  (uniform 1/n when that sum
               is below 1e-6).
    Erase      TIES sign election on the (selected) T_i: keep_i = [sign(T_i) == sign(sum_j T_j)], with a
               zero sum counting as +.
    out = B + sum_i keep_i w_i T_i / max(sum_i keep_i w_i, 1e-6)

No per-model weights and nothing random. Computed in the dtype the inputs arrive in; the result has it.
"""
from __future__ import annotations

from compose.merges.api import Method, Param
from compose.merges.task_arithmetic import sign_consensus


def _topk_variance_mask(tvs, fraction: float, dtype):
    """1 at the int(nonzero * fraction) entries of largest variance across tvs' dim 0, else 0."""
    import torch

    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(torch.count_nonzero(var) * fraction)
    mask = torch.zeros_like(var, dtype=dtype)
    if k == 0:
        return mask
    top = torch.topk(var.abs().view(-1), k=k, largest=True).indices
    mask.view(-1)[top] = 1
    return mask


def _model_weights(tvs):
    """Mean square of each task vector, normalised to sum 1 (uniform when they are all ~0)."""
    import torch

    energy = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < 1e-6:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def sce(tensors, base, *, seed=None, name="", int8_mask=False, select_topk=1.0):
    import torch

    if base is None:
        raise ValueError("sce needs a base model (base_model)")
    if not 0 < select_topk <= 1:
        raise ValueError(f"select_topk must lie in (0, 1]; got {select_topk}")
    b = tensors[base]
    models = [t for i, t in enumerate(tensors) if i != base]
    if not models:
        return b.clone()
    mask_dtype = torch.int8 if int8_mask else b.dtype
    tvs = torch.stack([m - b for m in models], dim=0)                   # (n, *shape)
    if select_topk < 1:
        tvs = tvs * _topk_variance_mask(tvs, select_topk, mask_dtype).unsqueeze(0)
    keep = sign_consensus(tvs, int8_mask)
    w = _model_weights(tvs).reshape((len(models),) + (1,) * b.dim())    # (n, 1, ..., 1)
    kept_w = w * keep
    merged = (tvs * kept_w).sum(dim=0)
    return b + merged / torch.sum(kept_w, dim=0).clamp(min=1e-6)


METHODS = [Method("sce", sce, base="required",
                  params=(Param("int8_mask", "shared", False, bool), Param("select_topk", "shared", 1.0)),
                  reference="https://arxiv.org/abs/2408.07990")]
