"""Generalized task arithmetic: eight merge methods that add sparsified, sign-filtered task vectors to a base.

    task_arithmetic   https://arxiv.org/abs/2212.04089  (Ilharco et al., Editing Models with Task Arithmetic)
    ties              https://arxiv.org/abs/2306.01708  (Yadav et al., TIES-Merging)
    dare_linear       https://arxiv.org/abs/2311.03099  (Yu et al., DARE: Drop And REscale)
    dare_ties         https://arxiv.org/abs/2311.03099
    breadcrumbs       https://arxiv.org/abs/2312.06795  (Davari & Belilovsky, Model Breadcrumbs)
    breadcrumbs_ties  https://arxiv.org/abs/2312.06795
    della             https://arxiv.org/abs/2406.11617  (Deep et al., DELLA-Merging)
    della_linear      https://arxiv.org/abs/2406.11617

All follow mergekit 0.1.5's GeneralizedTaskArithmeticMerge. With B the base and M_i the other models
(in input order, base left out):

    d_i   = sparsify(M_i - B, density_i)                 # per variant; see sparsify.py
    d_i  *= w_i
    TIES variants (sign consensus, "sum"): elect s = sign(sum_i d_i) (0 counts as +), then
          keep_i = [sign(d_i) == s]                       # zero entries never match s, so they drop out
          delta  = sum_i keep_i d_i ,  divisor = sum_i keep_i w_i   (0 -> 1)
    linear variants:
          delta  = sum_i d_i ,         divisor = sum_i w_i          (|.| < 1e-8 -> 1)
    if normalize: delta /= divisor
    out = B + lambda * delta

Everything is computed in the dtype the inputs arrive in (mergekit does too: bfloat16 inputs give
bfloat16 arithmetic), and the result has that dtype. DARE and DELLA draw their masks from a generator
seeded with `seed`, one draw per non-base model in input order, exactly as mergekit draws from torch's
global generator: `fn(..., seed=s)` equals mergekit's output when mergekit runs right after
`torch.manual_seed(s)` on the same device.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from functools import partial

from compose.merges import sparsify as sp
from compose.merges.api import Method, Param


def _check_fraction(name: str, values, low_open: bool = True):
    for v in values:
        if not ((0 < v <= 1) if low_open else (0 <= v <= 1)):
            bounds = "(0, 1]" if low_open else "[0, 1]"
            raise ValueError(f"{name} must lie in {bounds}; got {v}")


def _non_base(method: str, tensors, base):
    if base is None:
        raise ValueError(f"{method} needs a base model (base_model)")
    return tensors[base], [t for i, t in enumerate(tensors) if i != base]


def _broadcast(value, n: int):
    """A scalar given for a per-model parameter applies to every model (mergekit broadcasts it too)."""
    return [value] * n if isinstance(value, (int, float)) else value


def _per_model(name: str, values, n: int) -> list[float]:
    values = [float(v) for v in values]
    if len(values) != n:
        raise ValueError(f"{name}: expected one value per non-base model ({n}), got {len(values)}")
    return values


def sign_consensus(deltas, int8_mask: bool = False):
    """TIES sign election ("sum"): True where an entry of deltas (stacked on dim 0) has the sign of the
    column sum, with a zero sum counting as positive. `int8_mask` only holds the signs in int8 to save
    memory; the mask is boolean either way."""
    import torch

    # Signs are -1, 0 or 1, exact in int8 whatever the option says: the mask comes out the same, in an
    # eighth of the memory of float32 signs.
    signs = deltas.sign().to(torch.int8)
    elected = (deltas.sum(dim=0) >= 0).to(torch.int8) * 2 - 1
    return signs == elected


PARALLEL_MIN = 1 << 20
PARALLEL_MAX = 1 << 26
"""Tensors from PARALLEL_MIN to PARALLEL_MAX elements sparsify their models on parallel threads. Larger ones
(a large vocabulary's embedding: 394M entries at Llama-3.2-3B's shape) take one model at a time: their
full sorts are serialised anyway, and each model's scratch (float32 magnitudes, int64 order) is several
times the tensor."""


def generalized_task_arithmetic(tensors, base, *, method: str, consensus: bool, sparsifier: str | None,
                                seed=None, name="", weight, density=1.0, normalize, rescale, int8_mask=False,
                                gamma=None, epsilon=None, **params):
    import torch

    lam = float(params.pop("lambda", 1.0))
    if gamma is not None and sparsifier != "outliers":
        params["gamma"] = gamma
    if epsilon is not None and sparsifier != "della":
        params["epsilon"] = epsilon
    if params:
        raise TypeError(f"{method}: unknown parameter(s) {', '.join(sorted(params))}")
    b, models = _non_base(method, tensors, base)
    if not models:
        return b.clone()
    n = len(models)
    weights = _per_model("weight", _broadcast(weight, n), n)
    densities = _per_model("density", _broadcast(density, n), n)
    _check_fraction("density", densities)
    if sparsifier == "outliers":
        gammas = _per_model("gamma", _broadcast(0.01 if gamma is None else gamma, n), n)
        _check_fraction("gamma", gammas, low_open=False)
    if sparsifier == "della":
        epsilons = _per_model("epsilon", _broadcast(0.15 if epsilon is None else epsilon, n), n)

    generator = None
    if sparsifier in ("bernoulli", "della") and any(d < 1 for d in densities):
        if seed is None:
            raise ValueError(f"{method} draws random masks and needs a seed")
        # on the tensors' device, as mergekit's draws come from that device's global generator
        generator = torch.Generator(device=b.device).manual_seed(int(seed))

    # Memory matters here (the embedding of a large vocabulary is merged on several threads at once):
    # deltas fill one preallocated stack, and later steps work in place; the arithmetic is unchanged.
    deltas = b.new_empty((n, *b.shape))

    masks: dict[int, object] = {}
    if sparsifier == "bernoulli":
        # The draws come first, one model after another from the one generator (their order fixes the
        # result); what uses them can then run in parallel.
        masks = {i: sp.bernoulli_mask(b, densities[i], generator) for i in range(n) if densities[i] < 1}

    def sparsified(i: int) -> None:
        d = models[i] - b
        if sparsifier == "magnitude":
            d = sp.magnitude(d, densities[i], rescale, inplace=True)      # d is ours to overwrite
        elif sparsifier == "outliers":
            d = sp.outliers(d, densities[i], gammas[i], rescale)
        elif sparsifier == "bernoulli":
            d = sp.bernoulli(d, densities[i], rescale, mask=masks.get(i), inplace=True)
        elif sparsifier == "della":
            d = sp.della(d, densities[i], epsilons[i], rescale, generator)
        deltas[i] = d                                                    # cast to b's dtype

    if sparsifier != "della" and sparsifier and n > 1 and PARALLEL_MIN <= b.numel() < PARALLEL_MAX:
        # Large tensors run one model per thread (sorts and masking are single-threaded); DELLA's draws
        # depend on each model's ranks, so it stays in model order.
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(sparsified, range(n)))
    else:
        for i in range(n):
            sparsified(i)

    # weights in the compute dtype (mergekit rounds them there too), shaped to broadcast over an entry
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).reshape((n,) + (1,) * b.dim())
    deltas.mul_(w)

    if consensus:
        keep = sign_consensus(deltas, int8_mask)
        divisor = (w * keep).sum(dim=0)                                  # sum of the kept models' weights
        divisor[divisor == 0] = 1
        mixed = deltas.mul_(keep).sum(dim=0)
        del keep
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)                                           # (1,)*ndim: one scalar
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if normalize:
        mixed.div_(divisor)
    if lam != 1:
        mixed.mul_(lam)
    return mixed.add_(b).to(b.dtype)


# name -> (sign consensus, sparsifier, normalize default, rescale default, paper), as in mergekit 0.1.5
VARIANTS = {
    "task_arithmetic": (False, None, False, False, "https://arxiv.org/abs/2212.04089"),
    "ties": (True, "magnitude", True, False, "https://arxiv.org/abs/2306.01708"),
    "dare_ties": (True, "bernoulli", False, True, "https://arxiv.org/abs/2311.03099"),
    "dare_linear": (False, "bernoulli", False, True, "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": (False, "outliers", False, False, "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": (True, "outliers", False, False, "https://arxiv.org/abs/2312.06795"),
    "della": (True, "della", True, True, "https://arxiv.org/abs/2406.11617"),
    "della_linear": (False, "della", False, True, "https://arxiv.org/abs/2406.11617"),
}


def _method(name: str) -> Method:
    consensus, sparsifier, normalize, rescale, reference = VARIANTS[name]
    params = [
        Param("int8_mask", "shared", False, bool),
        Param("normalize", "shared", normalize, bool),
        Param("rescale", "shared", rescale, bool),
        Param("lambda", "shared", 1.0),
        Param("weight", "non_base"),
        Param("density", "non_base", 1.0),
    ]
    if sparsifier == "outliers":
        params.append(Param("gamma", "non_base", 0.01))
    if sparsifier == "della":
        params.append(Param("epsilon", "non_base", 0.15))
    fn = partial(generalized_task_arithmetic, method=name, consensus=consensus, sparsifier=sparsifier,
                 normalize=normalize, rescale=rescale)
    return Method(name, fn, base="required", params=tuple(params),
                  random=sparsifier in ("bernoulli", "della"), reference=reference)


METHODS = [_method(name) for name in VARIANTS]
