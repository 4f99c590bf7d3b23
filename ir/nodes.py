"""Node types of the architecture graph: frozen, typed ops that know their shapes.

Every op lists its parameters as weight expressions under Hugging Face's local names (`q_proj.weight`),
and `expected()` gives the shape each must have; the verifier compares the two and names the node.
Annotations that passes compute (`trainable`, `identity`) live on the op so the printer can show them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Mapping

from compose.errors import IRError
from compose.ir.weights import Expr, Shape


def _freeze(weights: Mapping[str, Expr]) -> tuple[tuple[str, Expr], ...]:
    return tuple(weights.items())


@dataclass(frozen=True, kw_only=True)
class Op:
    kind: ClassVar[str] = "Op"
    trainable: bool | None = None
    """Set by the trainable pass; None before it runs."""

    def params(self) -> dict[str, Expr]:
        raise NotImplementedError

    def expected(self) -> dict[str, Shape]:
        raise NotImplementedError

    def attrs(self) -> str:
        """The op's hyper-parameters as `k=v` text for the printer."""
        skip = {"weights", "trainable", "identity", "origin", "attn", "ffn", "input_norm", "post_norm"}
        return ", ".join(
            f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.name not in skip
        )

    def verify_(self, name: str) -> None:
        got, want = self.params(), self.expected()
        if set(got) != set(want):
            missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
            raise IRError(f"node {name}: weights missing {missing} / unexpected {extra}")
        for k, shape in want.items():
            if tuple(got[k].shape) != tuple(shape):
                raise IRError(
                    f"node {name}: weight {k} has shape {list(got[k].shape)}, expected {list(shape)}"
                    f" (from {got[k]})"
                )

    def with_weights(self, **updates: Expr) -> "Op":
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class _Leaf(Op):
    weights: tuple[tuple[str, Expr], ...]

    def params(self) -> dict[str, Expr]:
        return dict(self.weights)

    def with_weights(self, **updates: Expr) -> "_Leaf":
        w = dict(self.weights)
        unknown = set(updates) - set(w)
        if unknown:
            raise IRError(f"{self.kind} has no weights {sorted(unknown)}")
        w.update(updates)
        return dataclasses.replace(self, weights=_freeze(w))


@dataclass(frozen=True, kw_only=True)
class Embedding(_Leaf):
    kind: ClassVar[str] = "Embedding"
    vocab: int
    hidden: int

    def expected(self) -> dict[str, Shape]:
        return {"weight": (self.vocab, self.hidden)}


@dataclass(frozen=True, kw_only=True)
class Norm(_Leaf):
    """RMSNorm."""

    kind: ClassVar[str] = "Norm"
    dim: int
    eps: float

    def expected(self) -> dict[str, Shape]:
        return {"weight": (self.dim,)}


@dataclass(frozen=True, kw_only=True)
class Attention(_Leaf):
    """Multi-head self-attention with grouped KV heads and rotary positions."""

    kind: ClassVar[str] = "Attention"
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False

    def expected(self) -> dict[str, Shape]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        e: dict[str, Shape] = {
            "q_proj.weight": (q, self.hidden),
            "k_proj.weight": (kv, self.hidden),
            "v_proj.weight": (kv, self.hidden),
            "o_proj.weight": (self.hidden, q),
        }
        if self.qkv_bias:
            e.update({"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)})
        if self.o_bias:
            e["o_proj.bias"] = (self.hidden,)
        return e

    def verify_(self, name: str) -> None:
        if self.heads % self.kv_heads:
            raise IRError(f"node {name}: {self.heads} attention heads are not a multiple of {self.kv_heads} kv heads")
        super().verify_(name)


@dataclass(frozen=True, kw_only=True)
class DenseFFN(_Leaf):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    kind: ClassVar[str] = "DenseFFN"
    hidden: int
    intermediate: int
    act: str = "silu"
    bias: bool = False

    def expected(self) -> dict[str, Shape]:
        e: dict[str, Shape] = {
            "gate_proj.weight": (self.intermediate, self.hidden),
            "up_proj.weight": (self.intermediate, self.hidden),
            "down_proj.weight": (self.hidden, self.intermediate),
        }
        if self.bias:
            e.update({"gate_proj.bias": (self.intermediate,), "up_proj.bias": (self.intermediate,),
                      "down_proj.bias": (self.hidden,)})
        return e


@dataclass(frozen=True)
class Origin:
    """Where a block came from: a layer of a source model, new (a copy of one, changed at init), or a
    merge of blocks (`method` and `parts` set; `source`/`layer` are then the first part's)."""

    source: str
    layer: int
    new: bool = False
    method: str | None = None
    parts: tuple["Origin", ...] = ()

    @staticmethod
    def merged(method: str, parts: tuple["Origin", ...]) -> "Origin":
        return Origin(parts[0].source, parts[0].layer, method=method, parts=parts)

    def describe(self, alias=lambda ref: ref) -> str:
        if self.method:
            return f"{self.method} of {', '.join(p.describe(alias) for p in self.parts)}"
        return f"{'new copy of ' if self.new else ''}{alias(self.source)} layer {self.layer}"

    def __str__(self) -> str:
        return self.describe()


@dataclass(frozen=True, kw_only=True)
class DecoderBlock(Op):
    """Pre-norm transformer block: h += attn(norm1(h)); h += ffn(norm2(h))."""

    kind: ClassVar[str] = "DecoderBlock"
    attn: Attention
    ffn: DenseFFN
    input_norm: Norm
    post_norm: Norm
    origin: Origin
    identity: bool | None = None
    """Set by the function-preservation pass: True when the block provably adds exactly 0 at init."""

    _PARTS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("input_norm", "input_layernorm."),
        ("attn", "self_attn."),
        ("post_norm", "post_attention_layernorm."),
        ("ffn", "mlp."),
    )

    def params(self) -> dict[str, Expr]:
        out: dict[str, Expr] = {}
        for part, prefix in self._PARTS:
            out.update({prefix + k: v for k, v in getattr(self, part).params().items()})
        return out

    def expected(self) -> dict[str, Shape]:
        out: dict[str, Shape] = {}
        for part, prefix in self._PARTS:
            out.update({prefix + k: v for k, v in getattr(self, part).expected().items()})
        return out

    @property
    def hidden(self) -> int:
        return self.attn.hidden

    def verify_(self, name: str) -> None:
        widths = {self.attn.hidden, self.ffn.hidden, self.input_norm.dim, self.post_norm.dim}
        if len(widths) != 1:
            raise IRError(f"node {name}: parts disagree on the hidden width ({sorted(widths)})")
        self.attn.verify_(name)
        super().verify_(name)

    def with_weights(self, **updates: Expr) -> "DecoderBlock":
        parts = {part: {} for part, _ in self._PARTS}
        for k, v in updates.items():
            for part, prefix in self._PARTS:
                if k.startswith(prefix):
                    parts[part][k[len(prefix):]] = v
                    break
            else:
                raise IRError(f"DecoderBlock has no weight {k}")
        return dataclasses.replace(
            self, **{p: getattr(self, p).with_weights(**u) for p, u in parts.items() if u}
        )


@dataclass(frozen=True, kw_only=True)
class LMHead(_Leaf):
    """Output projection to the vocabulary; `tied` shares the embedding matrix (not written twice)."""

    kind: ClassVar[str] = "LMHead"
    vocab: int
    hidden: int
    tied: bool = False

    def expected(self) -> dict[str, Shape]:
        return {"weight": (self.vocab, self.hidden)}


def make(cls, weights: Mapping[str, Expr], **attrs):
    """Build a leaf op from a mapping of weights (keeps the caller's order)."""
    return cls(weights=_freeze(weights), **attrs)


__all__ = ["Op", "Embedding", "Norm", "Attention", "DenseFFN", "DecoderBlock", "LMHead", "Origin", "make"]
