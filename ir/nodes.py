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
        skip = {"weights", "trainable", "identity", "origin", "attn", "ffn", "input_norm", "post_norm", "vision",
                "attn_out_norm", "ffn_out_norm"}
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
    """Multi-head self-attention with grouped KV heads and rotary positions; with a `window`, each query
    sees itself and at most window - 1 keys before it (sliding-window attention), else every key before it."""

    kind: ClassVar[str] = "Attention"
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    o_bias: bool = False
    window: int | None = None
    qk_norm: bool = False
    """An RMSNorm over each query and each key head (of head_dim) before rope (Qwen3, Gemma 3)."""
    fused: bool = False
    """q, k and v as one matrix `qkv_proj`, stacked by rows (Phi-3): one tensor to every method, as in
    the checkpoint (a merge's norms and magnitude ranks are over the whole matrix, as mergekit's are)."""

    def expected(self) -> dict[str, Shape]:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        if self.fused:
            e: dict[str, Shape] = {"qkv_proj.weight": (q + 2 * kv, self.hidden)}
            if self.qkv_bias:
                e["qkv_proj.bias"] = (q + 2 * kv,)
        else:
            e = {"q_proj.weight": (q, self.hidden), "k_proj.weight": (kv, self.hidden),
                 "v_proj.weight": (kv, self.hidden)}
            if self.qkv_bias:
                e.update({"q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,)})
        e["o_proj.weight"] = (self.hidden, q)
        if self.o_bias:
            e["o_proj.bias"] = (self.hidden,)
        if self.qk_norm:
            e.update({"q_norm.weight": (self.head_dim,), "k_norm.weight": (self.head_dim,)})
        return e

    def verify_(self, name: str) -> None:
        if self.heads % self.kv_heads:
            raise IRError(f"node {name}: {self.heads} attention heads are not a multiple of {self.kv_heads} kv heads")
        if self.window is not None and self.window < 1:
            raise IRError(f"node {name}: sliding window {self.window} must be at least 1")
        super().verify_(name)


@dataclass(frozen=True, kw_only=True)
class DenseFFN(_Leaf):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    kind: ClassVar[str] = "DenseFFN"
    hidden: int
    intermediate: int
    act: str = "silu"
    bias: bool = False
    fused: bool = False
    """gate and up as one matrix `gate_up_proj`, gate's rows first (Phi-3)."""

    def expected(self) -> dict[str, Shape]:
        i, h = self.intermediate, self.hidden
        e: dict[str, Shape] = ({"gate_up_proj.weight": (2 * i, h)} if self.fused
                               else {"gate_proj.weight": (i, h), "up_proj.weight": (i, h)})
        e["down_proj.weight"] = (h, i)
        if self.bias:
            e.update({"gate_up_proj.bias": (2 * i,)} if self.fused else {"gate_proj.bias": (i,), "up_proj.bias": (i,)})
            e["down_proj.bias"] = (h,)
        return e


@dataclass(frozen=True, kw_only=True)
class Router(_Leaf):
    """Token-choice top-k router: softmax(x @ weight.T) over `experts`, the top `top_k` kept and, with
    `norm_topk_prob`, renormalised to sum to 1 (Mixtral always does; Qwen2-MoE/DeepSeek make it a flag)."""

    kind: ClassVar[str] = "Router"
    hidden: int
    experts: int
    top_k: int
    norm_topk_prob: bool = True
    init: str = ""
    """How the weight was initialised (`zeros`, `random(seed=0)`, `hidden`, ...): for the dump only."""

    def expected(self) -> dict[str, Shape]:
        return {"weight": (self.experts, self.hidden)}

    def verify_(self, name: str) -> None:
        if not 1 <= self.top_k <= self.experts:
            raise IRError(f"node {name}: top_k={self.top_k} must be between 1 and the {self.experts} experts")
        super().verify_(name)


@dataclass(frozen=True, kw_only=True)
class MoE(Op):
    """Mixture of experts in place of a block's FFN: out = sum over the router's top-k of p_e * expert_e(x),
    plus the always-on `shared` FFN (DeepSeekMoE's shared experts, concatenated into one FFN: the sum of
    FFNs over row blocks is one FFN over their concatenation).

    Weight names follow Qwen2-MoE (`gate.weight`, `experts.E.gate_proj.weight`, `shared_expert.*`);
    the hf backend renames them for the class it targets.
    """

    kind: ClassVar[str] = "MoE"
    router: Router
    experts: tuple[DenseFFN, ...]
    shared: DenseFFN | None = None
    shared_gate: Expr | None = None
    """Qwen2-MoE's gate on the shared FFN, sigmoid(x @ shared_gate.T) (1, hidden); None: always on (DeepSeek)."""
    jitter: float = 0.0
    """Router jitter noise (multiplicative, training only), recorded in the config."""
    aux_loss_coef: float = 0.001
    """Load-balancing loss coefficient, recorded in the config for training."""

    def _parts(self) -> list[tuple[str, Op]]:
        parts: list[tuple[str, Op]] = [("gate.", self.router)]
        parts += [(f"experts.{e}.", x) for e, x in enumerate(self.experts)]
        if self.shared is not None:
            parts.append(("shared_expert.", self.shared))
        return parts

    def params(self) -> dict[str, Expr]:
        out = {pre + k: v for pre, op in self._parts() for k, v in op.params().items()}
        if self.shared_gate is not None:
            out["shared_expert_gate.weight"] = self.shared_gate
        return out

    def expected(self) -> dict[str, Shape]:
        out = {pre + k: v for pre, op in self._parts() for k, v in op.expected().items()}
        if self.shared_gate is not None:
            out["shared_expert_gate.weight"] = (1, self.hidden)
        return out

    @property
    def hidden(self) -> int:
        return self.router.hidden

    @property
    def intermediate(self) -> int:
        """Width of one routed expert."""
        return self.experts[0].intermediate

    @property
    def act(self) -> str:
        return self.experts[0].act

    @property
    def bias(self) -> bool:
        return self.experts[0].bias

    def attrs(self) -> str:
        r = self.router
        s = (f"experts={r.experts}, top_k={r.top_k}, intermediate={self.intermediate}, "
             f"norm_topk_prob={r.norm_topk_prob}")
        if self.shared is not None:
            s += f", shared_intermediate={self.shared.intermediate}"
        return s + (f", router={r.init}" if r.init else "")

    def verify_(self, name: str) -> None:
        if len(self.experts) != self.router.experts:
            raise IRError(f"node {name}: the router has {self.router.experts} rows for {len(self.experts)} experts")
        widths = sorted({(x.hidden, x.intermediate) for x in self.experts})
        if len(widths) != 1:
            raise IRError(f"node {name}: experts of different widths {[list(w) for w in widths]} "
                          "(hidden, intermediate); every routed expert must have the same shape")
        kinds = {(x.act, x.bias) for x in self.experts + ((self.shared,) if self.shared else ())}
        if len(kinds) != 1:
            raise IRError(f"node {name}: experts disagree on activation or bias {sorted(kinds)}")
        if self.shared_gate is not None and self.shared is None:
            raise IRError(f"node {name}: a shared-expert gate without a shared expert")
        self.router.verify_(name)
        super().verify_(name)

    def with_weights(self, **updates: Expr) -> "MoE":
        router, experts, shared = self.router, list(self.experts), self.shared
        groups: dict[str, dict[str, Expr]] = {}
        updates = dict(updates)
        gate = updates.pop("shared_expert_gate.weight", self.shared_gate)
        for k, v in updates.items():
            pre = next((p for p, _ in self._parts() if k.startswith(p)), None)
            if pre is None:
                raise IRError(f"MoE has no weight {k}")
            groups.setdefault(pre, {})[k[len(pre):]] = v
        for pre, u in groups.items():
            if pre == "gate.":
                router = router.with_weights(**u)
            elif pre == "shared_expert.":
                shared = shared.with_weights(**u)
            else:
                e = int(pre.split(".")[1])
                experts[e] = experts[e].with_weights(**u)
        return dataclasses.replace(self, router=router, experts=tuple(experts), shared=shared, shared_gate=gate)


@dataclass(frozen=True, kw_only=True)
class VisionExpert(Op):
    """CogVLM's visual expert for one layer: its own QKV/output projections and FFN, of the language
    weights' shapes, used for image tokens only (a token-type router picks, per token, these or the
    language ones; norms and the attention softmax are shared)."""

    kind: ClassVar[str] = "VisionExpert"
    attn: Attention
    ffn: DenseFFN

    _PARTS: ClassVar[tuple[tuple[str, str], ...]] = (("attn", "self_attn."), ("ffn", "mlp."))

    def params(self) -> dict[str, Expr]:
        return {pre + k: v for part, pre in self._PARTS for k, v in getattr(self, part).params().items()}

    def expected(self) -> dict[str, Shape]:
        return {pre + k: v for part, pre in self._PARTS for k, v in getattr(self, part).expected().items()}

    def with_weights(self, **updates: Expr) -> "VisionExpert":
        parts: dict[str, dict[str, Expr]] = {"attn": {}, "ffn": {}}
        for k, v in updates.items():
            part = next((p for p, pre in self._PARTS if k.startswith(pre)), None)
            if part is None:
                raise IRError(f"VisionExpert has no weight {k}")
            parts[part][k.partition(".")[2]] = v
        return dataclasses.replace(self, **{p: getattr(self, p).with_weights(**u) for p, u in parts.items() if u})


@dataclass(frozen=True, kw_only=True)
class Adapter(_Leaf):
    """The vision adapter: image features (vision_width) -> the language model's width, a two-layer MLP
    fc2(gelu(fc1(x))) whose outputs take the image patches' places in the embedded sequence."""

    kind: ClassVar[str] = "Adapter"
    vision_width: int
    hidden: int

    def expected(self) -> dict[str, Shape]:
        return {"fc1.weight": (self.hidden, self.vision_width), "fc1.bias": (self.hidden,),
                "fc2.weight": (self.hidden, self.hidden), "fc2.bias": (self.hidden,)}


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
    """Pre-norm transformer block: h += attn(norm1(h)); h += ffn(norm2(h)). With the sandwich norms
    (Gemma 2 and 3), each sublayer's output is normalised too before it joins the residual:
    h += attn_out_norm(attn(norm1(h))); h += ffn_out_norm(ffn(norm2(h))).

    Weight names are the layout's own Hugging Face names: `post_attention_layernorm` is the FFN's input
    norm in a plain block (Llama's name) and the attention's output norm in a sandwich block, whose FFN
    input norm is `pre_feedforward_layernorm` (Gemma's names)."""

    kind: ClassVar[str] = "DecoderBlock"
    attn: Attention
    ffn: DenseFFN | MoE
    input_norm: Norm
    post_norm: Norm
    """The FFN's input norm."""
    origin: Origin
    attn_out_norm: Norm | None = None
    ffn_out_norm: Norm | None = None
    identity: bool | None = None
    """Set by the function-preservation pass: True when the block provably adds exactly 0 at init."""
    vision: VisionExpert | None = None
    """CogVLM's visual expert (weights `vision_expert.*`), None for a language-only block."""

    _PARTS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("input_norm", "input_layernorm."),
        ("attn", "self_attn."),
        ("post_norm", "post_attention_layernorm."),
        ("ffn", "mlp."),
        ("vision", "vision_expert."),
    )
    _SANDWICH_PARTS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("input_norm", "input_layernorm."),
        ("attn", "self_attn."),
        ("attn_out_norm", "post_attention_layernorm."),
        ("post_norm", "pre_feedforward_layernorm."),
        ("ffn", "mlp."),
        ("ffn_out_norm", "post_feedforward_layernorm."),
        ("vision", "vision_expert."),
    )

    @property
    def sandwich(self) -> bool:
        """Both sublayers' outputs are normalised (Gemma 2 and 3)."""
        return self.attn_out_norm is not None

    def _parts(self):
        parts = self._SANDWICH_PARTS if self.sandwich else self._PARTS
        return [(part, prefix) for part, prefix in parts if getattr(self, part) is not None]

    def params(self) -> dict[str, Expr]:
        out: dict[str, Expr] = {}
        for part, prefix in self._parts():
            out.update({prefix + k: v for k, v in getattr(self, part).params().items()})
        return out

    def expected(self) -> dict[str, Shape]:
        out: dict[str, Shape] = {}
        for part, prefix in self._parts():
            out.update({prefix + k: v for k, v in getattr(self, part).expected().items()})
        return out

    @property
    def hidden(self) -> int:
        return self.attn.hidden

    def residual_outputs(self) -> tuple[str, ...]:
        """The weights whose zeros make the block add exactly 0: the attention's o_proj and every FFN's down
        projection (an MoE's: each routed expert's and the shared expert's), with their biases. The output
        norms of a sandwich block (Gemma) map a zero vector to zero."""
        return tuple(k for k in self.params() if k.startswith("self_attn.o_proj.")
                     or (k.startswith("mlp.") and k.split(".")[-2] == "down_proj"))

    def verify_(self, name: str) -> None:
        if (self.attn_out_norm is None) != (self.ffn_out_norm is None):
            raise IRError(f"node {name}: a sandwich block needs both output norms (attention and FFN)")
        widths = {self.attn.hidden, self.ffn.hidden, self.input_norm.dim, self.post_norm.dim} | {
            n.dim for n in (self.attn_out_norm, self.ffn_out_norm) if n is not None}
        if len(widths) != 1:
            raise IRError(f"node {name}: parts disagree on the hidden width ({sorted(widths)})")
        self.attn.verify_(name)
        if isinstance(self.ffn, MoE):
            self.ffn.verify_(name)
        if self.vision is not None and (dataclasses.replace(self.vision.attn, weights=()) !=
                                        dataclasses.replace(self.attn, weights=(), trainable=self.vision.attn.trainable)
                                        or self.vision.ffn.intermediate != self.ffn.intermediate):
            raise IRError(f"node {name}: the visual expert's shapes differ from the language weights'")
        super().verify_(name)

    def with_weights(self, **updates: Expr) -> "DecoderBlock":
        parts = {part: {} for part, _ in self._parts()}
        for k, v in updates.items():
            for part, prefix in self._parts():
                if k.startswith(prefix):
                    parts[part][k[len(prefix):]] = v
                    break
            else:
                raise IRError(f"DecoderBlock has no weight {k}")
        return dataclasses.replace(
            self, **{p: getattr(self, p).with_weights(**u) for p, u in parts.items() if u}
        )


@dataclass(frozen=True, kw_only=True)
class Tensors(_Leaf):
    """A derived family's tensors outside its decoder stack (compose.families.derived), under their checkpoint
    names: `stem` is what comes before the stack (embeddings, a vision tower and its projector), `tail` what
    comes after it (the final norm, an untied head). compose does not compute with them: it carries them,
    copies them and merges them."""

    kind: ClassVar[str] = "Tensors"
    part: str
    shapes: tuple[tuple[str, Shape], ...]

    def expected(self) -> dict[str, Shape]:
        return dict(self.shapes)

    def attrs(self) -> str:
        return f"{self.part}, {len(self.shapes)} tensors"


@dataclass(frozen=True, kw_only=True)
class Layer(_Leaf):
    """One decoder layer of a derived family, known by its tensors (names below the stack's `i.`), the values
    its model's per-layer config fields give it (`fields`, JSON text), and its residual-output projections
    (`zero`): the tensors whose zeros make it add exactly 0 (LLaMA-Pro's identity copy zeroes them)."""

    kind: ClassVar[str] = "Layer"
    shapes: tuple[tuple[str, Shape], ...]
    origin: Origin
    fields: tuple[tuple[str, str], ...] = ()
    zero: tuple[str, ...] = ()
    family: str | None = None
    """The hand-written family that read this layer (an image-text-to-text class's language model, such as
    Gemma 3's), whose math names `zero`; None when it was derived from the class alone."""
    identity: bool | None = None

    def expected(self) -> dict[str, Shape]:
        return dict(self.shapes)

    def residual_outputs(self) -> tuple[str, ...]:
        return self.zero


@dataclass(frozen=True, kw_only=True)
class LMHead(_Leaf):
    """Output projection to the vocabulary; `tied` shares the embedding matrix (not written twice)."""

    kind: ClassVar[str] = "LMHead"
    vocab: int
    hidden: int
    tied: bool = False

    def expected(self) -> dict[str, Shape]:
        return {"weight": (self.vocab, self.hidden)}


@dataclass(frozen=True, kw_only=True)
class CrossAttention(_Leaf):
    """CALM's composition layer, after a main-chain block: h += o(attn(q(norm(h)), k(c), v(c))) where
    c = context_proj(the output of the side-chain block its cross edge comes from): multi-head, no rotary
    positions, and causal over the shared token sequence (query t reads context positions <= t). With o_proj
    zero it adds exactly 0: the composed model starts as the anchor. Which layers it joins is the graph's
    CalmLayout (and its edges), not the node's."""

    kind: ClassVar[str] = "CrossAttention"
    hidden: int
    context_hidden: int
    heads: int
    head_dim: int
    eps: float
    context: str
    """The side chain it reads (`augment`)."""
    identity: bool | None = None
    """Set by the function-preservation pass: True while o_proj is zero by construction."""

    def expected(self) -> dict[str, Shape]:
        inner = self.heads * self.head_dim
        return {"norm.weight": (self.hidden,), "context_proj.weight": (self.hidden, self.context_hidden),
                "q_proj.weight": (inner, self.hidden), "k_proj.weight": (inner, self.hidden),
                "v_proj.weight": (inner, self.hidden), "o_proj.weight": (self.hidden, inner)}


def make(cls, weights: Mapping[str, Expr], **attrs):
    """Build a leaf op from a mapping of weights (keeps the caller's order)."""
    return cls(weights=_freeze(weights), **attrs)


Block = DecoderBlock | Layer
"""A layer of the decoder stack: a hand-written family's typed block, or a derived family's layer."""

__all__ = ["Op", "Embedding", "Norm", "Attention", "DenseFFN", "Router", "MoE", "DecoderBlock", "LMHead", "Origin",
           "CrossAttention", "VisionExpert", "Adapter", "Tensors", "Layer", "Block", "make"]
