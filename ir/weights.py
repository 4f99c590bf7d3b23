"""Weight expressions: where every parameter of the graph comes from, evaluated late.

Expressions are frozen dataclasses, so structurally equal expressions are equal and hash alike: an
evaluator that memoises on the expression evaluates each distinct one once (CSE for free), and a pass can
rewrite an expression by building a new one. Every expression knows its shape and dtype without being
evaluated, so the verifier and the cost pass never touch tensor data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from compose.errors import IRError

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
class Ones(Expr):
    """An all-one tensor: a new norm's gain."""

    shape: Shape
    dtype: str

    def __str__(self) -> str:
        return f"ones{list(self.shape)}"


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
class Select(_Unary):
    """`x[index]`: one entry along the first dimension (one expert of a stacked expert tensor)."""

    index: int

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return tuple(self.x.shape[1:])

    def __str__(self) -> str:
        return f"{self.x}[{self.index}]"


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


@dataclass(frozen=True)
class LowRank(_Unary):
    """`x + scale * (b @ a)`, transposed first when `transpose` (PEFT's LoRA on an embedding, whose A and B
    are stored the other way round): a LoRA adapter folded into its base weight, as PEFT's
    `merge_and_unload` computes it (the product, then the scale, then the sum), in float32 at least and
    written in `x`'s dtype. The factors stay two small tensors, so the fold runs tensor by tensor."""

    a: Expr
    b: Expr
    scale: float
    transpose: bool = False

    def __post_init__(self) -> None:
        (r, cols), (rows, r_b) = self.a.shape, self.b.shape
        out = (cols, rows) if self.transpose else (rows, cols)
        if r != r_b or out != tuple(self.x.shape):
            raise IRError(f"{self}: B {list(self.b.shape)} @ A {list(self.a.shape)} does not give the weight's "
                          f"shape {list(self.x.shape)}")

    def children(self) -> tuple[Expr, ...]:
        return (self.x, self.a, self.b)

    def __str__(self) -> str:
        t = ", transpose" if self.transpose else ""
        return f"lora({self.x}, A={self.a}, B={self.b}, scale={self.scale!r}{t})"


def derive_seed(*parts) -> int:
    """The seed of one random tensor, from the parts that name it (the spec's seed first): crc32 of their
    ':'-joined text, the same on every run and machine (hash() of a str is not)."""
    import zlib

    return zlib.crc32(":".join(map(str, parts)).encode())


@dataclass(frozen=True)
class Const(Expr):
    """A tensor that no expression describes: drawn while lowering (a mergekit-moe random router), or
    computed when the build first evaluates it, where it depends on running a model (a router initialised
    from hidden states: `later`, so lowering and `compose inspect` never run one). Equality and hashing go
    by `digest` (sha256 of the bytes, or of what determines a later value), never the data."""

    label: str
    shape: Shape
    dtype: str
    digest: str
    value: object = field(compare=False, repr=False, hash=False)
    """The tensor, or a function of no arguments that computes it (Evaluator calls it)."""

    @staticmethod
    def of(label: str, tensor) -> "Const":
        import hashlib

        import torch

        t = tensor.detach().cpu().contiguous()
        digest = hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        return Const(label, tuple(t.shape), str(t.dtype).removeprefix("torch."), digest, t)

    @staticmethod
    def later(label: str, shape: Shape, dtype: str, recipe: str, compute) -> "Const":
        """A tensor of `shape` and `dtype` that `compute()` returns when evaluated; `recipe` says everything
        it depends on (its digest stands for the bytes)."""
        import hashlib

        return Const(label, tuple(shape), dtype, hashlib.sha256(recipe.encode()).hexdigest(), compute)

    def __str__(self) -> str:
        return f"const({self.label}, sha256={self.digest[:12]})"


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
class Stack(_Nary):
    """Same-shaped tensors stacked along a new first dimension (experts held as one tensor)."""

    inputs: tuple[Expr, ...]

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return (len(self.inputs), *self.inputs[0].shape)

    def __str__(self) -> str:
        return f"stack([{', '.join(map(str, self.inputs))}])"


_DTYPE_RANK = {"float16": 0, "bfloat16": 0, "float32": 1, "float64": 2}


def promote(dtypes: list[str]) -> str:
    """torch.promote_types over dtype names: fp16 with bf16 gives float32, else the widest."""
    ds = set(dtypes)
    if len(ds) == 1:
        return ds.pop()
    if ds <= {"float16", "bfloat16"}:
        return "float32"
    return max(ds, key=lambda d: _DTYPE_RANK.get(d, 1))


def _freeze(v):
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


@dataclass(frozen=True)
class Merge(_Nary):
    """One output tensor merged from same-shaped inputs by a named method (see compose.merges).

    `base` is the index of the base model among `inputs` (None without one). `params` are the method's
    parameters resolved for this tensor, sorted (name, value) pairs; per-input values are tuples.
    `seed` is set for random methods, `name` is the output tensor's name (some methods look at it), and
    `compute` the dtype inputs are cast to first (None: their promoted dtype, as mergekit does).
    """

    method: str
    inputs: tuple[Expr, ...]
    base: int | None = None
    params: tuple[tuple[str, object], ...] = ()
    seed: int | None = None
    name: str = ""
    compute: str | None = None

    def __post_init__(self) -> None:
        # Lists become tuples so the expression stays hashable (and so CSE-able).
        object.__setattr__(self, "params", tuple(sorted((k, _freeze(v)) for k, v in self.params)))

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return self.inputs[0].shape

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.compute or promote([x.dtype for x in self.inputs])

    def settings(self) -> str:
        """The method's settings as text: `base=0, density=(0.3, 0.6), seed=7`."""
        parts = ([f"base={self.base}"] if self.base is not None else []) + [f"{k}={v!r}" for k, v in self.params]
        parts += [f"seed={self.seed}"] if self.seed is not None else []
        parts += [f"compute={self.compute}"] if self.compute else []
        return ", ".join(parts)

    def __str__(self) -> str:
        s = self.settings()
        return f"{self.method}([{', '.join(map(str, self.inputs))}]{', ' + s if s else ''})"


def written_units(e: Expr) -> tuple[Expr, ...]:
    """The expressions an output tensor is written from: itself, or each part a stacked or concatenated
    output is assembled from (compose_moe's stacked experts, a fused expert's gate and up)."""
    if isinstance(e, (Stack, Concat)):
        return tuple(u for x in e.inputs for u in written_units(x))
    return (e,)


def is_zero(e: Expr) -> bool:
    """True when `e` is zero by construction (not by inspecting data)."""
    if isinstance(e, Zeros):
        return True
    if isinstance(e, (Slice, Select, Scale)):
        return is_zero(e.x)
    if isinstance(e, Concat):
        return all(is_zero(x) for x in e.inputs)
    return False


@dataclass(frozen=True)
class Rows(_Nary):
    """Rows picked from the inputs (all of one width): output row j is the mean of the input rows
    `picks[start[j]:start[j+1]]`, each pick an (input `src[k]`, row `row[k]`) pair; one pick copies a row,
    none gives a zero row. This is a remapped vocabulary (compose.lower.tokenizer): a token keeps its own
    row, and a token a model lacks gets another model's row or a mean of several. Sums run in pick order
    and are divided once, as mergekit computes them, so the bits match. The picks are stored flat (CSR),
    not as a tuple per row: a 150k-token vocabulary stays a few megabytes, and the hash is computed once.
    `compute` is the dtype inputs are cast to first (None: their promoted dtype).
    """

    inputs: tuple[Expr, ...]
    start: tuple[int, ...]
    src: tuple[int, ...]
    row: tuple[int, ...]
    compute: str | None = None

    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.inputs, self.start, self.src, self.row, self.compute))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def shape(self) -> Shape:  # type: ignore[override]
        return (len(self.start) - 1, *self.inputs[0].shape[1:])

    @property
    def dtype(self) -> str:  # type: ignore[override]
        return self.compute or promote([x.dtype for x in self.inputs])

    def settings(self) -> str:
        """A summary (the table itself can be a vocabulary long) and a digest of the whole table, so
        dumps and graph hashes still tell two different remaps apart."""
        import hashlib

        counts = [b - a for a, b in zip(self.start, self.start[1:])]
        table = repr((self.start, self.src, self.row)).encode()
        parts = [f"{len(counts)} rows", f"{counts.count(1)} picked", f"{sum(c > 1 for c in counts)} averaged",
                 f"{counts.count(0)} zero", f"sha256={hashlib.sha256(table).hexdigest()[:12]}"]
        return ", ".join(parts + ([f"compute={self.compute}"] if self.compute else []))

    def __str__(self) -> str:
        return f"rows([{', '.join(map(str, self.inputs))}], {self.settings()})"
