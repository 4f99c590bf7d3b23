"""The weight-expression evaluator: turns expressions into tensors, one output tensor at a time.

Memory stays bounded by the largest tensors, not the model: a `Load` is not kept (reading it again is
the cheapest way to get it again) unless it is one the caller asks to keep (what the cse pass found
several outputs to be), and a computed expression used by several outputs is kept only until its last
use and only within `cache_bytes`; past that it is recomputed. Within one output every distinct
sub-expression is evaluated once. Several threads may evaluate outputs at once (the writer prefetches):
the bookkeeping is locked, the tensor work is not.
"""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, Iterable

from compose.errors import IRError
from compose.ir.weights import (Concat, Const, Expr, Load, LowRank, Merge, Noise, Ones, Rows, Scale, Select, Slice, Stack,
                                Zeros)

TORCH_DTYPES = ("float32", "bfloat16", "float16", "float64")


def torch_dtype(name: str):
    import torch

    if name not in TORCH_DTYPES:
        raise IRError(f"unsupported dtype {name!r}")
    return getattr(torch, name)


class Evaluator:
    def __init__(self, roots: Iterable[Expr], read: Callable[[Load], object], cache_bytes: int = 256 << 20,
                 device: str = "cpu", keep: Iterable[Expr] = ()):
        """`keep`: expressions several outputs use (the cse pass's `state.shared`), kept until their last
        use even when they are plain loads, and computed by one thread while the others wait for it."""
        self.read = read
        self.keep = frozenset(keep)
        self.pending: dict[Expr, threading.Event] = {}
        self.cache_bytes = cache_bytes
        self.device = device
        self.lock = threading.Lock()
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
        owner = wait = None
        with self.lock:
            t = local.get(e, self.kept.get(e))
            if t is None and e in self.keep:
                wait = self.pending.get(e)
                if wait is None:
                    owner = self.pending[e] = threading.Event()
        if wait is not None:  # another thread is computing it: its result, unless it did not fit
            wait.wait()
            with self.lock:
                t = self.kept.get(e)
        try:
            if t is None:
                t = self._compute(e, local)
                local[e] = t
            with self.lock:
                self.uses[e] -= 1
                if self.uses[e] <= 0:
                    if e in self.kept:
                        self.kept_bytes -= _nbytes(self.kept.pop(e))
                elif ((not isinstance(e, Load) or e in self.keep) and e not in self.kept
                      and self.kept_bytes + _nbytes(t) <= self.cache_bytes):
                    self.kept[e] = t
                    self.kept_bytes += _nbytes(t)
        finally:
            if owner is not None:
                with self.lock:
                    del self.pending[e]
                owner.set()
        return t

    def _compute(self, e: Expr, local: dict):
        import torch

        if isinstance(e, Load):
            t = self.read(e).to(self.device)
            if tuple(t.shape) != tuple(e.shape):
                raise IRError(f"{e}: read shape {list(t.shape)}, the header said {list(e.shape)}")
            return t
        if isinstance(e, Zeros):
            return torch.zeros(e.shape, dtype=torch_dtype(e.dtype), device=self.device)
        if isinstance(e, Ones):
            return torch.ones(e.shape, dtype=torch_dtype(e.dtype), device=self.device)
        if isinstance(e, Const):
            t = e.value() if callable(e.value) else e.value  # computed now (Const.later), or drawn while lowering
            if tuple(t.shape) != tuple(e.shape) or t.dtype != torch_dtype(e.dtype):
                raise IRError(f"{e}: computed {t.dtype} {list(t.shape)}, expected {e.dtype} {list(e.shape)}")
            return t.to(self.device)
        if isinstance(e, Slice):
            return self._get(e.x, local).narrow(e.dim, e.start, e.stop - e.start)
        if isinstance(e, Select):
            return self._get(e.x, local)[e.index]
        if isinstance(e, Concat):
            return torch.cat([self._get(x, local) for x in e.inputs], dim=e.dim)
        if isinstance(e, Stack):
            return torch.stack([self._get(x, local) for x in e.inputs])
        if isinstance(e, Scale):
            return self._get(e.x, local) * e.factor
        if isinstance(e, Noise):
            x = self._get(e.x, local)
            g = torch.Generator().manual_seed(e.seed)  # drawn on the CPU: the same noise on every device
            return x + e.std * torch.randn(x.shape, generator=g, dtype=torch.float32).to(x.device, x.dtype)
        if isinstance(e, LowRank):
            return _low_rank(e, self._get(e.x, local), self._get(e.a, local), self._get(e.b, local))
        if isinstance(e, Merge):
            return _merge(e, [self._get(x, local) for x in e.inputs])
        if isinstance(e, Rows):
            return _rows(e, [self._get(x, local) for x in e.inputs])
        raise IRError(f"cannot evaluate {type(e).__name__}")


def _merge(e: Merge, xs: list):
    from compose.merges.registry import get

    dtype = torch_dtype(e.dtype)
    xs = [x.to(dtype) for x in xs]
    try:
        out = get(e.method).fn(xs, e.base, seed=e.seed, name=e.name, **dict(e.params))
    except ValueError as err:  # the method's own refusal of its parameters
        raise IRError(f"tensor {e.name}: {e.method} ({e.settings()}): {err}") from None
    if tuple(out.shape) != tuple(e.shape):
        raise IRError(f"{e.method} returned shape {list(out.shape)} for {e.name}, expected {list(e.shape)}")
    return out


def _low_rank(e: LowRank, x, a, b):
    """PEFT's merge, step for step: delta = (B @ A) * scale in float32 (PEFT casts half-precision factors
    up on the CPU), then `weight += delta`, which adds in float32 and rounds once to the weight's dtype."""
    import torch

    dtype = torch_dtype(e.dtype)
    c = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    delta = b.to(c) @ a.to(c)
    if e.transpose:
        delta = delta.T
    delta = delta * e.scale
    return (x.to(torch.promote_types(x.dtype, c)) + delta).to(dtype)


def _rows(e: Rows, xs: list):
    """Vectorised over rows, in the order mergekit computes each row (see Rows): copies are gathered
    per input; means add the k-th pick of every row with that many picks, then divide once."""
    import torch

    dtype = torch_dtype(e.dtype)
    xs = [x.to(dtype) for x in xs]
    dev = xs[0].device
    start = torch.tensor(e.start, dtype=torch.long)
    src = torch.tensor(e.src, dtype=torch.long)
    row = torch.tensor(e.row, dtype=torch.long)
    counts = start[1:] - start[:-1]
    out = torch.zeros(e.shape, dtype=dtype, device=dev)  # rows with no pick stay zero
    for c in counts.unique().tolist():
        if c == 0:
            continue
        rows = torch.nonzero(counts == c).flatten()
        acc = None if c == 1 else torch.zeros((len(rows), *e.shape[1:]), dtype=dtype, device=dev)
        for k in range(c):
            pick = start[rows] + k
            for i in src[pick].unique().tolist():
                m = src[pick] == i
                vals = xs[i].index_select(0, row[pick[m]].to(dev))
                if acc is None:
                    out[rows[m].to(dev)] = vals
                else:
                    acc[m.to(dev)] = acc[m.to(dev)] + vals
        if acc is not None:
            acc /= c
            out[rows.to(dev)] = acc
    return out


def _nbytes(t) -> int:
    return t.numel() * t.element_size()
