"""What lowering and passes know about a whole graph, as typed, frozen records (no free-form dict).

A fact lives in one place: on a node when it is about that node (`trainable`, `identity`, a block's
origin, an attention's window), in one of these records when it is about the graph. The printer shows
every record; derived summaries (which blocks are identities, which layers are MoE) are computed from
the nodes, never stored beside them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, Union

from compose.errors import IRError

if TYPE_CHECKING:
    from compose.ir.weights import Expr

TRAIN_RULES = ("all", "new", "cross", "vision")
TrainRule = Literal["all", "new", "cross", "vision"]
"""What trains: `all` (continued pre-training), `new` (LLaMA-Pro: only new blocks), `cross` (CALM: only the
cross-attention layers), `vision` (CogVLM: only the visual experts and the adapter)."""


class BuiltTokenizer(Protocol):
    """A tokenizer made for the output (a merged vocabulary), written next to the weights."""

    def write(self, out: Path) -> list[str]: ...


TokenizerSource = Union[str, BuiltTokenizer]
"""Where the output's tokenizer files come from: a source reference (its files are copied) or a tokenizer
built for the output."""


@dataclass(frozen=True)
class MoELayout:
    """How lowering made the graph's mixture-of-experts layers (what the MoE nodes do not say)."""

    kind: Literal["upcycle", "from_experts", "fine_grained"]
    segments: int | None = None
    """fine_grained: each dense FFN cut into this many experts."""
    shared_experts: int | None = None
    preserve: bool | None = None
    """fine_grained: the dense FFN is the shared part and routed experts start at zero (exact)."""

    def describe(self) -> str:
        extra = [f"{k}={getattr(self, k)!r}" for k in ("segments", "shared_experts", "preserve")
                 if getattr(self, k) is not None]
        return f"{self.kind}({', '.join(extra)})" if extra else self.kind


@dataclass(frozen=True)
class CalmLayout:
    """CALM: which anchor layer each cross-attention follows and which augmenting layer it reads, in the
    order of the xattn.K nodes, and the augmenting model's source (`composed` when it has none)."""

    pairs: tuple[tuple[int, int], ...]
    augment: str


@dataclass(frozen=True)
class Target:
    """The checkpoint the graph is written as: the family module that writes it and its class."""

    family: str
    architecture: str


@dataclass(frozen=True)
class Shared:
    """One weight expression several output tensors are (an upcycled FFN, E experts): the cse pass lists
    them so the writer evaluates or reads it once and writes it to each."""

    expr: "Expr"
    names: tuple[str, ...]
    """The output tensors (checkpoint names) that are this expression, in file order."""


@dataclass(frozen=True)
class Fusion:
    """How the generated module (and the ONNX graphs exported from it) computes what the checkpoint holds:
    the fusion passes' decisions. The checkpoint itself is the same either way."""

    qkv: bool = False
    """q, k and v as one matmul: one qkv_proj (the checkpoint's three matrices concatenated at load)."""
    gate_up: bool = False
    """gate and up as one matmul: one gate_up_proj (concatenated at load)."""
    experts: Literal["stacked"] | None = None
    """stacked: each MoE layer's experts as one (E, ...) tensor per projection, for grouped GEMM."""

    def describe(self) -> str:
        parts = [p for p, on in (("qkv", self.qkv), ("gate_up", self.gate_up)) if on]
        if self.experts:
            parts.append(f"experts {self.experts}")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class Cost:
    """Parameters, active parameters per token, trainable parameters, FLOPs per token and bytes."""

    layers: int
    params: int
    active_params: int
    trainable_params: int
    flops_per_token: int
    bytes: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class State:
    """The graph-level records; None (or empty) where nothing is known yet."""

    train: TrainRule = "all"
    tokenizer: TokenizerSource | None = None
    moe: MoELayout | None = None
    calm: CalmLayout | None = None
    dropped: tuple[tuple[str, int], ...] = ()
    """(source, layer) of the blocks dead-weight elimination removed: never read."""
    target: Target | None = None
    shared: tuple[Shared, ...] = ()
    """What the cse pass found: expressions written under more than one name."""
    fusion: Fusion = Fusion()
    cost: Cost | None = None

    def __post_init__(self) -> None:
        if self.train not in TRAIN_RULES:
            raise IRError(f"unknown trainable rule {self.train!r} (rules: {', '.join(TRAIN_RULES)})")

    def but(self, **changes) -> "State":
        """A copy with some records replaced."""
        return replace(self, **changes)
