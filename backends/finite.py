"""Non-finite weights are never written silently.

A source tensor holding NaN or Inf is an error naming it (a broken checkpoint spreads through every merge
that reads it), unless the user allows it, and then a warning names every one. An output tensor that is
not finite although every source it reads is, came from compose's own arithmetic (a slerp at t = nan,
linear weights that sum to zero, an overflow in the output dtype): an error naming the tensor and the
expression with its parameters.
"""
from __future__ import annotations

import sys
import threading

from compose.errors import BuildError, SourceError
from compose.ir.weights import Expr, Load, Merge, Rows


def _finite(t) -> bool:
    import torch

    return not t.is_floating_point() or bool(torch.isfinite(t).all())


class FiniteCheck:
    def __init__(self, allow_nonfinite: bool):
        self.allow = allow_nonfinite
        self.lock = threading.Lock()
        self.bad_sources: set[tuple[str, str]] = set()

    def source(self, e: Load, t):
        if not _finite(t):
            if not self.allow:
                raise SourceError(f"{e.source}: tensor {e.key} holds NaN or Inf values (a broken checkpoint?); "
                                  "pass --allow-nonfinite to build anyway")
            with self.lock:
                self.bad_sources.add((e.source, e.key))
        return t

    def output(self, name: str, expr: Expr, t):
        if _finite(t):
            return t
        loads = {(x.source, x.key) for x in expr.walk() if isinstance(x, Load)}
        with self.lock:
            if loads & self.bad_sources:
                return t  # allowed, and already named by warn()
        raise BuildError(f"tensor {name}: {_culprit(expr)} produced NaN or Inf from finite inputs")

    def warn(self) -> None:
        if self.bad_sources:
            names = ", ".join(f"{s}:{k}" for s, k in sorted(self.bad_sources))
            print(f"compose: warning: non-finite source tensors (--allow-nonfinite): {names}", file=sys.stderr)


def _culprit(expr: Expr) -> str:
    """The merges of an expression with their parameters (where a NaN comes from), else the expression."""
    merges = [x for x in expr.walk() if isinstance(x, (Merge, Rows))]
    if not merges:
        return f"the expression {expr}"
    return "; ".join(f"{m.method if isinstance(m, Merge) else 'rows'} ({m.settings()})" for m in merges[:3])
