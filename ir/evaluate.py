"""The weight-expression evaluator: turns expressions into tensors, one output tensor at a time.

Memory stays bounded by the largest tensors, not the model: a `Load` is never kept (re-reading from an
mmapped safetensors file is the cheapest way to get it again), and a computed expression used by several
outputs is kept only until its last use and only within `cache_bytes`; past that it is recomputed.
Within one output every distinct sub-expression is evaluated once.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

from compose.errors import IRError
from compose.ir.weights import Concat, Expr, Load, Merge, Noise, Scale, Slice, Zeros

TORCH_DTYPES = ("float32", "bfloat16", "float16", "float64")


def torch_dtype(name: str):
    import torch

    if name not in TORCH_DTYPES:
        raise IRError(f"unsupported dtype {name!r}")
    return getattr(torch, name)


class Evaluator:
    def __init__(self, roots: Iterable[Expr], read: Callable[[Load], object], cache_bytes: int = 1 << 30):
        self.read = read
        self.cache_bytes = cache_bytes
        self.uses: Counter[Expr] = Counter()
        seen: set[Expr] = set()
        for r in roots:
            self.uses[r] += 1
            for e in r.walk():
                if e not in seen:
                    seen.add(e)
                    for c in e.children():
                        self.uses[c] += 1
        self.kept: dict[Expr, object] = {}
        self.kept_bytes = 0

    def __call__(self, root: Expr):
        local: dict[Expr, object] = {}
        return self._get(root, local)

    def _get(self, e: Expr, local: dict):
        if e in local:
            t = local[e]
        elif e in self.kept:
            t = self.kept[e]
        else:
            t = self._compute(e, local)
            local[e] = t
        self.uses[e] -= 1
        if self.uses[e] <= 0:
            if e in self.kept:
                self.kept_bytes -= _nbytes(self.kept.pop(e))
        elif not isinstance(e, Load) and e not in self.kept and self.kept_bytes + _nbytes(t) <= self.cache_bytes:
            self.kept[e] = t
            self.kept_bytes += _nbytes(t)
        return t

    def _compute(self, e: Expr, local: dict):
        import torch

        if isinstance(e, Load):
            t = self.read(e)
            if tuple(t.shape) != tuple(e.shape):
                raise IRError(f"{e}: read shape {list(t.shape)}, the header said {list(e.shape)}")
            return t
        if isinstance(e, Zeros):
            return torch.zeros(e.shape, dtype=torch_dtype(e.dtype))
        if isinstance(e, Slice):
            return self._get(e.x, local).narrow(e.dim, e.start, e.stop - e.start)
        if isinstance(e, Concat):
            return torch.cat([self._get(x, local) for x in e.inputs], dim=e.dim)
        if isinstance(e, Scale):
            return self._get(e.x, local) * e.factor
        if isinstance(e, Noise):
            x = self._get(e.x, local)
            g = torch.Generator().manual_seed(e.seed)
            return x + e.std * torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.dtype)
        if isinstance(e, Merge):
            return _merge(e, [self._get(x, local) for x in e.inputs])
        raise IRError(f"cannot evaluate {type(e).__name__}")


def _merge(e: Merge, xs: list):
    params = dict(e.params)
    if e.method != "linear":
        raise IRError(f"merge method {e.method!r} is not implemented yet")
    weights = params.get("weights") or [1.0] * len(xs)
    total = sum(weights) if params.get("normalize", True) else 1.0
    out = sum(w * x.float() for w, x in zip(weights, xs)) / total
    return out.to(xs[0].dtype)


def _nbytes(t) -> int:
    return t.numel() * t.element_size()
