"""Sparsifiers for task vectors (delta = model - base), as mergekit 0.1.5 applies them before merging:

- `magnitude`  keep the largest |delta| (TIES, https://arxiv.org/abs/2306.01708)
- `outliers`   drop the largest `gamma` fraction and the smallest, keep `density` (Model Breadcrumbs,
               https://arxiv.org/abs/2312.06795)
- `bernoulli`  keep each entry with probability `density` (DARE, https://arxiv.org/abs/2311.03099)
- `della`      keep each entry with a probability that grows with its magnitude rank (DELLA-Merging,
               https://arxiv.org/abs/2406.11617)

Each returns a tensor of the input's shape and dtype. With `rescale`, the kept entries are scaled so the
L1 norm of the result equals the L1 norm of the input (mergekit's `RescaleNorm.l1`; DARE's 1/density is
the expectation of that factor). `density >= 1` returns the input itself, untouched.

Dtype details follow mergekit so results match it bit for bit: magnitudes are ranked in float32 on CPU,
and the random sparsifiers work in float32 on CPU unless the input is bfloat16 (torch has no CPU
bernoulli for float16; mergekit also rounds float64 to float32 there), in the input dtype elsewhere.
"""
from __future__ import annotations

import contextlib
import threading

RESCALE_EPS = 1e-7
"""Below this L1 norm (before or after masking) mergekit leaves the masked tensor unscaled."""


_FULL_SORT = threading.Lock()
SORT_ALONE = 1 << 26
"""Full sorts of at least this many entries run one at a time (their scratch, float32 magnitudes and an
int64 order, is several times the tensor); smaller ones run side by side, on as many threads as merge
(a sort of one tensor is single-threaded in torch, so serialising them all left a core idle)."""


def _work_dtype(t):
    import torch

    return t.dtype if t.device.type != "cpu" or t.dtype == torch.bfloat16 else torch.float32


def _rank_magnitudes(t):
    """|t| flattened; float32 on CPU (mergekit sorts there in float32), the tensor's dtype elsewhere."""
    w = t.abs().reshape(-1)
    return w.float() if w.device.type == "cpu" else w


def apply_mask(t, mask, rescale: bool, inplace: bool = False):
    """t * mask; with `rescale`, times ||t||_1 / ||t * mask||_1 unless either norm is below RESCALE_EPS.
    `inplace` overwrites t (for callers that own it: a full-size copy less at the peak)."""
    before = t.abs().sum() if rescale else None
    masked = t.mul_(mask) if inplace else t * mask
    if not rescale:
        return masked
    after = masked.abs().sum()
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked * (before / after)


def magnitude(t, density: float, rescale: bool = False, inplace: bool = False):
    """Keep the k = max(1, int(density * n)) entries of largest magnitude (ties broken by torch's sort)."""
    import torch

    if density >= 1:
        return t
    if density <= 0 or t.numel() == 0:
        return torch.zeros_like(t)
    k = max(1, int(density * t.numel()))
    w = _rank_magnitudes(t)
    mask = _top_k_mask(w, k)
    if mask is None:
        mask = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        with _FULL_SORT if w.numel() >= SORT_ALONE else contextlib.nullcontext():
            # Sorted in place (w is ours): the permutation argsort gives (mergekit's), without a copy of
            # the values beside the int64 order.
            order = torch.empty(w.numel(), dtype=torch.int64, device=w.device)
            torch.sort(w, descending=True, out=(w, order))
            mask[order[:k]] = True
            del order
    del w
    # x * True == x * 1.0 and x * False == x * 0.0 bit for bit: no float copy of the mask is needed
    return apply_mask(t, mask.reshape_as(t), rescale, inplace)


def _top_k_mask(w, k: int):
    """The mask of the k largest entries of w by selection (O(n)) instead of a full sort (O(n log n)),
    when that set is unambiguous: every entry above the k-th largest value, plus all entries equal to it
    when exactly the needed number do, or when it is 0 (zeros kept or not change no product). Otherwise
    (a tie at a non-zero threshold) None: which of the tied entries survive is decided by torch's sort
    order, and only the sort reproduces it."""
    thr = w.kthvalue(w.numel() - k + 1).values
    above = w > thr
    need = k - int(above.sum())
    if need == 0 or float(thr) == 0.0:
        return above  # (tied zeros: keeping some of them keeps nothing)
    tied = w == thr
    return above | tied if int(tied.sum()) == need else None


def outliers(t, density: float, gamma: float, rescale: bool = False):
    """Breadcrumbs: sort |t| ascending and keep the window of int(density * n) entries that ends just below
    the top int(gamma * n). When density + gamma > 1 the window slides down to start at the smallest entry,
    so fewer than gamma * n outliers are dropped. Unlike `magnitude`, int(density * n) = 0 keeps nothing."""
    import torch

    if density >= 1:
        return t
    n = t.numel()
    keep_n = int(density * n)
    top_n = int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)  # smallest entries dropped
    ascending = torch.sort(_rank_magnitudes(t), descending=False).indices
    mask = torch.zeros(n, dtype=t.dtype, device=t.device)
    mask[ascending[bottom_n:bottom_n + keep_n]] = 1
    return apply_mask(t, mask.reshape_as(t), rescale)


def bernoulli_mask(t, density: float, generator=None):
    """DARE's keep mask for t: an independent Bernoulli(density) draw per entry, in storage order."""
    import torch

    dtype = _work_dtype(t)
    if dtype == torch.float32 and t.device.type == "cpu":
        # torch.bernoulli(p) on CPU draws u ~ U[0, 1) per entry and keeps u < p: the same draws and
        # comparisons, vectorised (bit-identical masks, tested against torch.bernoulli).
        return torch.rand(t.shape, generator=generator, dtype=torch.float32) < density
    return torch.bernoulli(torch.full_like(t, density, dtype=dtype), generator=generator)


def bernoulli(t, density: float, rescale: bool = False, generator=None, mask=None, inplace: bool = False):
    """DARE: keep each entry with probability `density` (`mask` drawn already, or drawn here)."""
    if density >= 1:
        return t
    mask = bernoulli_mask(t, density, generator) if mask is None else mask
    work = t.to(_work_dtype(t))
    return apply_mask(work, mask, rescale, inplace and work is t).to(t.dtype)


def della(t, density: float, epsilon: float, rescale: bool = False, generator=None):
    """DELLA MagPrune: within each row (dim 1 of the tensor; a 1-D tensor is one row), rank the entries by
    magnitude, r = 1 (smallest) .. m (largest), and keep entry r with probability

        p_r = (density - epsilon) + 2 * epsilon * (r - 1) / (m - 1)

    so p runs linearly from density - epsilon to density + epsilon and averages density. Both ends must lie
    in (0, 1). The ranks are held in the work dtype, as mergekit does (in bfloat16 they round above 256)."""
    import torch

    if density >= 1:
        return t
    if density <= 0:
        return torch.zeros_like(t)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"epsilon: density +/- epsilon must lie in (0, 1); got density {density}, "
                         f"epsilon {epsilon}")
    dtype = _work_dtype(t)
    rows = t.unsqueeze(0) if t.dim() < 2 else t
    if rows.dim() < 2 or rows.shape[1] == 1:                             # a 0-d tensor stays 1-D
        # rank 1 of 1 gives 0/0 in the probabilities; mergekit fails inside torch.bernoulli here
        raise ValueError(f"della ranks entries along dim 1, and a tensor of shape {list(t.shape)} has only one "
                         "there; use density 1 (or another method) for it")
    # argsort of the ascending argsort gives each entry's 0-based rank along dim 1
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, descending=False), dim=1).to(dtype) + 1
    lo = ranks.min(dim=1, keepdim=True).values
    hi = ranks.max(dim=1, keepdim=True).values
    rank01 = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank01 * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(dtype)
    return apply_mask(rows.to(dtype), mask, rescale).to(t.dtype).reshape(t.shape)
