"""Linear merge (model soups, Wortsman et al. 2022; SPHINX's beta-mix is this with weights beta, 1-beta):
sum_i w_i * x_i, divided by sum_i w_i when `normalize` (the default)."""
from __future__ import annotations

from compose.merges.api import Method, Param


CHUNK = 1 << 22
"""Elements per block: each output is computed block by block in one reused float32 buffer of 16 MB, so a
0.8 GB embedding costs that buffer, not float32 copies of every input (and their page faults)."""


def linear(tensors, base, *, seed=None, name="", weight, normalize=True):
    import torch

    first = tensors[0]
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    total = sum(float(w) for w in weight)
    if normalize and total == 0:
        raise ValueError(f"the weights {[float(w) for w in weight]} sum to 0 and cannot be normalized "
                         "(set normalize: false or change them)")
    flat = [t.reshape(-1) for t in tensors]
    n = first.numel()
    out = torch.empty(n, dtype=first.dtype, device=first.device)
    acc = torch.empty(min(CHUNK, n), dtype=dtype, device=first.device)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        a = acc[:stop - start].zero_()
        for t, w in zip(flat, weight):
            a.add_(t[start:stop], alpha=float(w))  # the input's block cast on the fly: same sums as whole
        if normalize:
            a.div_(total)
        out[start:stop].copy_(a)
    return out.view(first.shape)


METHODS = [Method("linear", linear, base="ignored",
                  params=(Param("weight", "input"), Param("normalize", "shared", True, bool)),
                  reference="https://arxiv.org/abs/2203.05482")]
