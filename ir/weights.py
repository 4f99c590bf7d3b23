"""Weight expressions: where every parameter of the graph comes from, evaluated late.

Expressions are frozen dataclasses, so structurally equal expressions are equal and hash alike: an
evaluator that memoises on the expression evaluates each distinct one once (CSE for free), and a pass can
rewrite an expression by building a new one. Every expression knows its shape and dtype without being
evaluated, so the verifier and the cost pass never touch tensor data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

Shape = tuple[int, ...]


class Expr:
    shape: Shape
    dtype: str

    def children(self) -> tuple["Expr", ...]:
        return ()

    def walk(self) -> Iterator["Expr"]:
        """Every sub-expression, children before parents (each distinct one once)."""
        seen: set[Expr] = set()
        stack: list[tuple[Expr, bool]] = [(self, False)]
        while stack:
            e, expanded = stack.pop()
            if expanded:
                yield e
                continue
            if e in seen:
                continue
            seen.add(e)
            stack.append((e, True))
            stack.extend((c, False) for c in reversed(e.children()))

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Load(Expr):
    """A tensor read from a model source (`source` is its canonical reference)."""

    source: str
    key: str
    shape: Shape
    dtype: str

    def __str__(self) -> str:
        return f"load({self.source}, {self.key})"


@dataclass(frozen=True)
class Zeros(Expr):
    """An all-zero tensor: what makes LLaMA-Pro's new blocks exact identities."""

    shape: Shape
    dtype: str

    def __str__(self) -> str:
        return f"zeros{list(self.shape)}"


@dataclass(frozen=True)
class _Unary(Expr):
    """An expression of one input whose shape and dtype it keeps (unless it says otherwise)."""

    x: Expr

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return self.x.shape

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.x.dtype

    def children(self) -> tuple[Expr, ...]:
        return (self.x,)


@dataclass(frozen=True)
class Slice(_Unary):
    """`x[..., start:stop, ...]` along `dim`."""

    dim: int
    start: int
    stop: int

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        s = list(self.x.shape)
        s[self.dim] = self.stop - self.start
        return tuple(s)

    def __str__(self) -> str:
        return f"slice({self.x}, dim={self.dim}, {self.start}:{self.stop})"


@dataclass(frozen=True)
class Scale(_Unary):
    """`factor * x`."""

    factor: float

    def __str__(self) -> str:
        return f"scale({self.x}, {self.factor!r})"


@dataclass(frozen=True)
class Noise(_Unary):
    """`x + std * N(0, 1)` drawn from a generator seeded with `seed`: deterministic for the seed."""

    std: float
    seed: int

    def __str__(self) -> str:
        return f"noise({self.x}, std={self.std!r}, seed={self.seed})"


class _Nary(Expr):
    """An expression of several same-dtype inputs (`inputs`)."""

    inputs: tuple[Expr, ...]

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.inputs[0].dtype

    def children(self) -> tuple[Expr, ...]:
        return self.inputs


@dataclass(frozen=True)
class Concat(_Nary):
    """Tensors joined along `dim`."""

    inputs: tuple[Expr, ...]
    dim: int

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        s = list(self.inputs[0].shape)
        s[self.dim] = sum(x.shape[self.dim] for x in self.inputs)
        return tuple(s)

    def __str__(self) -> str:
        return f"concat([{', '.join(map(str, self.inputs))}], dim={self.dim})"


@dataclass(frozen=True)
class Merge(_Nary):
    """A merge of same-shaped tensors by a named method (`params` are sorted (name, value) pairs).

    Only `linear` is evaluated so far; the merge methods arrive with the weight-merging issue.
    """

    method: str
    inputs: tuple[Expr, ...]
    params: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        # Lists become tuples so the expression stays hashable (and so CSE-able).
        frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in self.params))
        object.__setattr__(self, "params", frozen)

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return self.inputs[0].shape

    def __str__(self) -> str:
        ps = "".join(f", {k}={v!r}" for k, v in self.params)
        return f"merge.{self.method}([{', '.join(map(str, self.inputs))}]{ps})"


def is_zero(e: Expr) -> bool:
    """True when `e` is zero by construction (not by inspecting data)."""
    if isinstance(e, Zeros):
        return True
    if isinstance(e, (Slice, Scale)):
        return is_zero(e.x)
    if isinstance(e, Concat):
        return all(is_zero(x) for x in e.inputs)
    return False
