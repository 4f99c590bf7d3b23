"""The gguf backend: the hf checkpoint a build wrote -> one GGUF file (`model.gguf`) that llama.cpp loads.

Written through the `gguf` package (the writer llama.cpp publishes), tensor by tensor: the tensor table is
laid out from the graph's shapes first, then each tensor is read from the build's safetensors, transformed
and written before the next is read, so memory is one tensor (one layer's stacked experts), not the model.
Names, layouts and metadata keys are those of llama.cpp's own converter (convert_hf_to_gguf.py and its
`conversion/` modules) and of the loaders in llama.cpp's src/models/<arch>.cpp, checked against the
llama.cpp that llama-cpp-python 0.3.36 vendors:

- llama (Llama, Mistral, Mixtral): q/k rows permuted from Hugging Face's rotate-half order to the
  interleaved pairs llama.cpp's NORM rope rotates (the converter's llama `permute`), Mixtral's
  experts stacked into ffn_{gate,up,down}_exps (E, width, hidden); every other family rotates halves
  (NEOX) and is written unpermuted.
- Gemma 2/3: llama.cpp computes RMSNorm as w * x / rms(x), transformers as (1 + w) * x / rms(x): every
  norm weight is written as 1 + w, computed in float32 as transformers does.
- Norms, biases and routers are float32 (llama.cpp's CPU kernels take them so, as the converter writes
  them); every other tensor keeps the build's dtype (F32, F16 or BF16), so the weights are exact.

What llama.cpp computes differently from transformers is refused by name before anything is written
(`plan`): a sliding window on an architecture without one, Qwen2-MoE's or Qwen3-MoE's routing with the
other `norm_topk_prob`, dense layers in an all-MoE architecture, rope types llama.cpp scales otherwise,
composites and generated classes. Two representations make compose's own outputs exact in llama.cpp:

- Qwen2-MoE with compose's zero shared-expert gate (DeepSeekMoE's always-on shared experts, or a
  zero-width one; see families/qwen2_moe.py): transformers computes sigmoid(0) = 1/2 exactly, but
  llama.cpp's qwen2moe computes that sigmoid as silu(x) / x (src/models/qwen2moe.cpp), 0/0 = NaN at
  exactly zero, and has no dense layers. Such a model is written as llama.cpp's `deepseek` architecture
  (DeepSeek-MoE: `leading_dense_block_count` dense layers, then always-on shared experts beside softmax
  top-k routing without renormalisation), its shared down projection halved (exact: a power of two) so
  that it adds what 1/2 * shared(x) adds in transformers. The shared width must be a whole number of
  expert widths there (`expert_shared_count`), so it is padded with zero rows and columns, which add 0.
- Tied embeddings on an architecture whose loader requires `output.weight` (qwen2moe) are written twice.

Vocabulary (backends/gguf_vocab.py): a build with tokenizer.json gets its tokens, types and merges
(byte-level BPE as llama.cpp's `gpt2` model with the pre-tokenizer named for its split regex,
SentencePiece-style BPE as `llama`) and the special token ids; a build without a tokenizer (the built-in
tiny models) gets `tokenizer.ggml.model = "none"` and `vocab_size`, which llama.cpp loads as that many
placeholder tokens: the model evaluates token ids, and text cannot be tokenized.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from compose.families.base import moe_blocks
from compose.ir import Graph
from compose.ir.nodes import DenseFFN, MoE
from compose.ir.weights import Zeros

from compose import families
from compose.backends import gguf_vocab
from compose.errors import BuildError, install_hint

FILE = "model.gguf"


@dataclass(frozen=True)
class Arch:
    """What one llama.cpp architecture computes, as its loader and graph builder in src/models/ do."""

    permute_qk: bool = False
    """NORM rope (pairs of consecutive head values): q/k rows are permuted from Hugging Face's halves."""
    experts: bool = False
    dense_layers: str = "all"
    """Which layers may be dense: `all`, `none` (every layer an MoE) or `leading` (the first k)."""
    shared: str | None = None
    """Shared experts: None, `gated` (sigmoid as silu(x)/x, Qwen2-MoE) or `always` (DeepSeek-MoE)."""
    norm_topk: bool | None = None
    """The top-k routing weights renormalised (fixed by the graph builder; None: no experts)."""
    windows: str = "none"
    """Sliding windows: `none`, or `per_layer` (a size and a per-layer pattern, Gemma)."""
    needs_output: bool = False
    """The loader requires output.weight (no fallback to the embeddings for a tied head)."""
    tied_only: bool = False
    """The head is always the embeddings (Gemma 2 reads no output.weight)."""
    qk_norm: bool = False
    sandwich: bool = False
    square_attention: bool = False
    """The loader wants q and o projections of width x width (heads * head_dim = hidden)."""
    act: tuple[str, ...] = ("silu",)
    """The MLP activations (transformers' names) the graph builder computes."""
    fused: bool = False
    """q/k/v as one attn_qkv and gate/up as one ffn_up (gate rows first: llama.cpp's SWIGLU takes silu of
    the first half), as Phi-3 stores them; otherwise separate, as every other converter writes them."""


_GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")

ARCHS: dict[str, Arch] = {
    "LLAMA": Arch(permute_qk=True, experts=True, dense_layers="all", norm_topk=True),
    "QWEN2": Arch(),
    "QWEN3": Arch(qk_norm=True),
    "QWEN2MOE": Arch(experts=True, dense_layers="none", shared="gated", norm_topk=False, needs_output=True,
                     square_attention=True),
    "QWEN3MOE": Arch(experts=True, dense_layers="none", norm_topk=True, qk_norm=True),
    "DEEPSEEK": Arch(permute_qk=True, experts=True, dense_layers="leading", shared="always", norm_topk=False,
                     square_attention=True),
    "GEMMA2": Arch(windows="per_layer", tied_only=True, sandwich=True, act=_GELU_TANH),
    "GEMMA3": Arch(windows="per_layer", qk_norm=True, sandwich=True, act=_GELU_TANH),
    # Phi-3 and Phi-4: llama.cpp ignores sliding_window (src/models/phi3.cpp), so a window shorter than the
    # context is refused like any other window on an architecture without one.
    "PHI3": Arch(square_attention=True, fused=True),
}
"""The architectures compose writes, by their names in gguf.MODEL_ARCH (llama.cpp's, upper-cased). llama's
MoE layers are Mixtral's (a llama with n_expert > 0)."""

_F32_NAMES = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight", "rope_freqs.weight")
_GGML = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_FILE_TYPE = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16"}


@dataclass(frozen=True)
class Out:
    """One GGUF tensor: read `keys` from the hf checkpoint, `make` it, write it as `shape`."""

    name: str
    keys: tuple[str, ...]
    shape: tuple[int, ...]
    make: Callable = None  # list of tensors -> tensor; None: the one tensor as it is

    @property
    def f32(self) -> bool:
        return len(self.shape) <= 1 or self.name.endswith(("_norm.weight", ".bias")) or self.name.endswith(_F32_NAMES)


@dataclass
class Plan:
    """Everything the writer does, decided from the graph before any byte is written."""

    arch: str
    tensors: list[Out] = field(default_factory=list)
    meta: list[tuple[str, tuple]] = field(default_factory=list)
    """GGUFWriter method name and arguments, in order."""
    vocab: gguf_vocab.Vocab = gguf_vocab.NONE
    """The vocabulary, decided from the tokenizer files the build copies (see `_tokenizer_folder`): its
    refusals come before anything is written."""

    def add(self, method: str, *args) -> None:
        self.meta.append((method, args))

    def nbytes(self, dtype: str) -> int:
        size = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
        return sum(math.prod(t.shape) * (4 if t.f32 else size) for t in self.tensors)


def plan(g: Graph, read: Callable | None, open_source: Callable) -> Plan:
    """The GGUF file of `g`: its architecture, metadata and tensors, or a BuildError naming why not (the
    front door plans before the build writes anything, so a refusal leaves nothing behind). `read` (a Load ->
    its tensor) lets the plan look at the values of the shared-expert gates (see `_zero_gate`);
    `open_source` (a source reference -> its source) finds the tokenizer files the build copies."""
    import importlib.util

    if importlib.util.find_spec("gguf") is None:  # refused here, before anything is written
        raise BuildError(f"--format gguf needs the gguf package (llama.cpp's writer): {install_hint('gguf')}")

    if g.composite:
        raise BuildError(f"--format gguf: a {g.composite} composite (cross-attention or visual experts) has no "
                         "llama.cpp architecture; build it with --format hf or torch")
    fam = _target(g)
    if fam.generated or fam.gguf_arch is None:
        written = sorted(f.architecture for f in families.REGISTRY.values() if f.gguf_arch and not f.generated)
        raise BuildError(f"--format gguf: llama.cpp has no architecture for {fam.architecture}"
                         + (" (compose's generated class)" if fam.generated else "")
                         + f"; compose writes GGUF for {', '.join(written)}")
    blocks = [b for _, b in g.blocks()]
    moes = dict(moe_blocks(g))
    name = fam.gguf_arch.upper()
    zero = {i: _zero_gate(m.shared_gate, read) for i, m in moes.items()} if name == "QWEN2MOE" else {}
    if name == "QWEN2MOE" and moes and all(zero.values()):
        name = "DEEPSEEK"  # compose's zero gate: NaN in llama.cpp's qwen2moe; exact as DeepSeek-MoE
    elif name == "QWEN2MOE" and any(zero.values()):
        raise BuildError("--format gguf: some shared-expert gates are compose's zeros and some are learned; "
                         "llama.cpp holds one or the other (deepseek or qwen2moe)")
    arch = ARCHS[name]
    where = f"--format gguf (llama.cpp {name.lower()})"
    c = g.config
    _check_attention(g, arch, where)
    p = Plan(name, vocab=gguf_vocab.decide(_tokenizer_folder(g, open_source)))
    dense = [i for i, b in enumerate(blocks) if i not in moes]
    if moes:
        _check_moe(g, moes, dense, arch, where)

    # -- metadata, as the converter and llama.cpp's loader name it ------------------------------------
    import gguf

    p.add("add_block_count", len(blocks))
    p.add("add_context_length", c.max_positions)
    p.add("add_embedding_length", c.hidden)
    widths = {blocks[i].ffn.intermediate for i in dense}
    if len(widths) > 1:
        raise BuildError(f"{where}: dense layers of different widths {sorted(widths)}; llama.cpp has one")
    first_moe = next(iter(moes.values()), None)
    ff = widths.pop() if widths else (first_moe.intermediate if name == "LLAMA" else c.intermediate)
    p.add("add_feed_forward_length", ff)
    p.add("add_head_count", c.heads)
    p.add("add_head_count_kv", c.kv_heads)
    p.add("add_key_length", c.head_dim)
    p.add("add_value_length", c.head_dim)
    p.add("add_rope_dimension_count", c.head_dim)
    p.add("add_layer_norm_rms_eps", c.rms_eps)
    p.add("add_vocab_size", c.vocab)
    p.add("add_file_type", int(getattr(gguf.LlamaFileType, _FILE_TYPE[c.dtype])))
    rope_freqs = _rope(p, c, c.head_dim, where)
    if c.local_rope is not None:
        if c.local_rope.type != "default" or c.local_rope.partial_rotary_factor not in (None, 1.0):
            raise BuildError(f"{where}: the sliding layers' rope is {c.local_rope.type}; llama.cpp scales only the "
                             "global layers' rope")
        p.add("add_rope_freq_base_swa", c.local_rope.theta)
    if first_moe is not None:
        p.add("add_expert_count", first_moe.router.experts)
        p.add("add_expert_used_count", first_moe.router.top_k)
        if name != "LLAMA":
            p.add("add_expert_feed_forward_length", first_moe.intermediate)
    shared_count = 0
    if name == "QWEN2MOE":
        p.add("add_expert_shared_feed_forward_length", first_moe.shared.intermediate)
    if name == "DEEPSEEK":
        p.add("add_leading_dense_block_count", len(dense))
        width = first_moe.shared.intermediate if first_moe.shared is not None else 0
        shared_count = max(1, -(-width // first_moe.intermediate))
        p.add("add_expert_shared_count", shared_count)
        p.add("add_expert_weights_scale", 1.0)
    if arch.windows == "per_layer":
        _gemma(p, g, name, where)

    # -- tensors -------------------------------------------------------------------------------------
    T = gguf.MODEL_TENSOR
    allowed = set(gguf.MODEL_TENSORS[gguf.MODEL_ARCH[name]])
    names = {k for _, named in fam.tensors(g) for k in named}

    def tname(t, bid=None, suffix=".weight") -> str:
        if t not in allowed:
            raise BuildError(f"{where}: llama.cpp's {name.lower()} has no tensor {gguf.TENSOR_NAMES[t]} "
                             "(compose cannot write this model for it)")
        return gguf.TENSOR_NAMES[t].format(bid=bid) + suffix

    def out(t, key, shape, bid=None, make=None, suffix=".weight"):
        p.tensors.append(Out(tname(t, bid, suffix), (key,) if isinstance(key, str) else tuple(key), tuple(shape), make))

    offset = fam.features.norm == "offset_rms"
    norm = _plus_one if offset else None
    embed = next(k for k in names if k.endswith("embed_tokens.weight"))
    out(T.TOKEN_EMBD, embed, (c.vocab, c.hidden))
    if rope_freqs is not None:
        p.tensors.append(Out(tname(T.ROPE_FREQS), (), (len(rope_freqs),), lambda _, f=rope_freqs: _tensor(f)))
    for i, b in enumerate(blocks):
        ckpt = _checkpoint_names(fam, f"model.layers.{i}.", b)
        _block(out, T, i, b, ckpt, arch, name, norm, c, shared_count)
    out(T.OUTPUT_NORM, "model.norm.weight", (c.hidden,), make=norm)
    if not g.head.tied:
        if arch.tied_only:
            raise BuildError(f"{where}: an untied head; llama.cpp's {name.lower()} always uses the embeddings as "
                             "the head")
        out(T.OUTPUT, "lm_head.weight", (c.vocab, c.hidden))
    elif arch.needs_output:
        out(T.OUTPUT, embed, (c.vocab, c.hidden))
    return p


def _target(g: Graph):
    if g.state.target is None:
        raise BuildError("the graph has no target class yet: backends write what the target pass chose")
    return families.get(g.state.target.family)


def _tokenizer_folder(g: Graph, open_source: Callable) -> Path | None:
    """Where the build's tokenizer files come from: the tokenizer source's folder (copied into the build), or
    a merged tokenizer's first base's folder (a merge adds or strips tokens, and keeps its base's
    pre-tokenizer; a merge of merges, its base's base's); None for a model without one."""
    ref = g.state.tokenizer
    while ref is not None and not isinstance(ref, str) and ref.folder is None:
        ref = ref.base
    if ref is None:
        return None
    if isinstance(ref, str):
        return open_source(ref).folder
    return ref.folder


def _checkpoint_names(fam, prefix: str, b) -> dict[str, str]:
    """IR name (Hugging Face's Llama / Qwen2-MoE local names) -> the target class's checkpoint name."""
    ir = list(b.params())
    ckpt = list(fam.block_names(prefix, b))
    if len(ir) != len(ckpt):
        raise BuildError(f"--format gguf: {fam.architecture} stores layer {prefix} in a layout compose cannot map")
    return dict(zip(ir, ckpt))


def _check_attention(g: Graph, arch: Arch, where: str) -> None:
    c = g.config
    if c.rope.partial_rotary_factor not in (None, 1.0):
        raise BuildError(f"{where}: a partial rotary factor {c.rope.partial_rotary_factor}; compose writes GGUF "
                         "for fully rotating heads only")
    if c.act not in arch.act:
        raise BuildError(f"{where}: the MLP activation {c.act!r}; llama.cpp's architecture computes {arch.act[0]}")
    for name, b in g.blocks():
        a = b.attn
        if a.fused != arch.fused:
            raise BuildError(f"{where}: node {name} has {'fused' if a.fused else 'separate'} q/k/v; llama.cpp's "
                             f"architecture reads {'separate' if a.fused else 'fused'} ones")
        if a.fused and (a.qkv_bias or a.o_bias or (isinstance(b.ffn, DenseFFN) and b.ffn.bias)):
            raise BuildError(f"{where}: node {name} has fused projections with biases, which llama.cpp's "
                             "architecture does not have")
        if a.qk_norm != arch.qk_norm:
            raise BuildError(f"{where}: node {name} has {'a' if a.qk_norm else 'no'} q/k norm, and llama.cpp's "
                             f"architecture has {'one' if arch.qk_norm else 'none'}")
        if b.sandwich != arch.sandwich:
            raise BuildError(f"{where}: node {name}'s norms do not match the architecture's")
        if a.window is not None and arch.windows == "none" and a.window < c.max_positions:
            raise BuildError(f"{where}: node {name} attends within a sliding window of {a.window}, and llama.cpp's "
                             "architecture attends to every earlier token; it would compute other logits past "
                             f"{a.window} tokens")
        if isinstance(b.ffn, DenseFFN) and b.ffn.fused != arch.fused:
            raise BuildError(f"{where}: node {name} has {'a fused' if b.ffn.fused else 'separate'} gate/up "
                             f"projection{'' if b.ffn.fused else 's'}, and llama.cpp's architecture reads "
                             f"{'separate' if b.ffn.fused else 'fused'} ones")
        if arch.square_attention and a.heads * a.head_dim != c.hidden:
            raise BuildError(f"{where}: node {name} has {a.heads} heads of {a.head_dim}, not the width {c.hidden}; "
                             "llama.cpp's architecture has square q and o projections")
    if c.attn_softcap is not None and not arch.sandwich:
        raise BuildError(f"{where}: attention soft-capping, which llama.cpp's architecture does not have")
    if c.final_softcap is not None and not arch.sandwich:
        raise BuildError(f"{where}: final logit soft-capping, which llama.cpp's architecture does not have")


def _check_moe(g: Graph, moes: dict[int, MoE], dense: list[int], arch: Arch, where: str) -> None:
    if not arch.experts:
        raise BuildError(f"{where}: mixture-of-experts layers, which this architecture does not have")
    if dense and arch.dense_layers == "none":
        raise BuildError(f"{where}: layer {dense[0]} is dense, and every layer of llama.cpp's architecture is a "
                         "mixture of experts")
    if arch.dense_layers == "leading" and dense != list(range(len(dense))):
        late = next(d for j, d in enumerate(dense) if d != j)
        raise BuildError(f"{where}: layer {late} is dense after an MoE layer; llama.cpp's deepseek keeps only the "
                         "first layers dense (first_k_dense)")
    for i, m in moes.items():
        if m.router.norm_topk_prob != arch.norm_topk:
            verb = "renormalises" if m.router.norm_topk_prob else "does not renormalise"
            raise BuildError(f"{where}: layer {i} {verb}"
                             f" its top-k routing weights (norm_topk_prob {m.router.norm_topk_prob}), and llama.cpp "
                             f"always {'does' if arch.norm_topk else 'does not'}; build with "
                             f"norm_topk_prob={arch.norm_topk} for llama.cpp")
        if m.bias:
            raise BuildError(f"{where}: layer {i}'s experts have biases, which llama.cpp's experts do not have")
        has_shared = m.shared is not None and m.shared.intermediate > 0
        if arch.shared is None and has_shared:
            raise BuildError(f"{where}: layer {i} has shared experts, which llama.cpp's architecture does not have")
        if arch.shared == "gated" and not has_shared:
            raise BuildError(f"{where}: layer {i} has no shared expert, which llama.cpp's qwen2moe requires")
        if arch.shared == "gated" and m.shared_gate is None:
            raise BuildError(f"{where}: layer {i}'s shared expert has no gate, which llama.cpp's qwen2moe requires")
        if arch.shared == "always" and m.shared is not None and (m.shared.bias or m.shared.fused):
            raise BuildError(f"{where}: layer {i}'s shared expert has biases or a fused gate/up")


def _rope(p: Plan, c, head_dim: int, where: str):
    """Rope metadata (and llama3's per-frequency factors, as the converter's rope_freqs tensor)."""
    import gguf

    rope = c.rope
    p.add("add_rope_freq_base", rope.theta)
    if rope.type == "default":
        return None
    if rope.type == "yarn":
        _yarn(p, c, head_dim, where)
        return None
    if rope.type == "linear":
        p.add("add_rope_scaling_type", gguf.RopeScalingType.LINEAR)
        p.add("add_rope_scaling_factor", rope.factor)
        return None
    if rope.type == "llama3":
        freqs = [1.0 / (rope.theta ** (i / head_dim)) for i in range(0, head_dim, 2)]
        factor, low, high = rope.factor or 8.0, rope.low_freq_factor or 1.0, rope.high_freq_factor or 4.0
        old = rope.original_max_positions or 8192
        low_wavelen, high_wavelen = old / low, old / high
        out = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < high_wavelen:
                out.append(1.0)
            elif wavelen > low_wavelen:
                out.append(factor)
            else:
                smooth = (old / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return out
    if rope.type == "longrope":
        raise BuildError(f"{where}: rope type 'longrope'; llama.cpp picks its long or short factors by the context "
                         "size it is run with, and transformers by each sequence's length, so short prompts in a "
                         "long context would get other logits")
    raise BuildError(f"{where}: rope type {rope.type!r}; compose writes GGUF for default, linear, llama3 and yarn "
                     "ropes (llama.cpp computes the others' scaling its own way)")


def _yarn(p: Plan, c, head_dim: int, where: str) -> None:
    """YaRN as llama.cpp computes it (0.3.36: ggml's rope_yarn and llama-context's attention factor): the
    ramp between the correction dims of beta_fast = 32 and beta_slow = 1 over the original context, floored
    and ceiled, and cos/sin scaled by 1 + 0.1 ln(factor) times `rope.scaling.attn_factor`. transformers'
    YaRN is the same function for those betas; what llama.cpp cannot be told (other betas, an unfloored
    ramp, DeepSeek's mscale) is refused."""
    import gguf

    from compose.codegen.rope import yarn

    r = c.rope
    if (r.beta_fast or 32) != 32 or (r.beta_slow or 1) != 1:
        raise BuildError(f"{where}: YaRN with beta_fast {r.beta_fast} and beta_slow {r.beta_slow}; llama.cpp reads "
                         "no betas for this architecture and uses 32 and 1")
    if r.truncate is False:
        raise BuildError(f"{where}: YaRN with truncate false; llama.cpp always floors and ceils the ramp's ends")
    if r.mscale or r.mscale_all_dim:
        raise BuildError(f"{where}: YaRN with mscale/mscale_all_dim (DeepSeek's attention factor); compose writes "
                         "GGUF for the default attention factor or an explicit attention_factor")
    s = yarn(c, head_dim)
    factor = s["rope_factor"]
    p.add("add_rope_scaling_type", gguf.RopeScalingType.YARN)
    p.add("add_rope_scaling_factor", factor)
    p.add("add_rope_scaling_orig_ctx_len", r.original_max_positions)
    llama_cpp_scale = 1.0 + 0.1 * math.log(factor)  # ggml multiplies cos and sin by this for every yarn rope
    if s["rope_attention_factor"] != llama_cpp_scale:
        p.add("add_rope_scaling_attn_factors", s["rope_attention_factor"] / llama_cpp_scale)


def _gemma(p: Plan, g: Graph, name: str, where: str) -> None:
    """Gemma's soft-caps, query scale and per-layer sliding windows."""
    c = g.config
    blocks = [b for _, b in g.blocks()]
    # llama.cpp scales queries by head_dim ** -0.5 (hidden / heads for the 27B models it recognises by depth).
    by_depth = {"GEMMA2": 46, "GEMMA3": 62}[name]
    expect = (c.hidden // c.heads) if len(blocks) == by_depth else c.head_dim
    if (c.query_scale or c.head_dim) != expect:
        raise BuildError(f"{where}: query_pre_attn_scalar {c.query_scale}; llama.cpp scales the queries of this "
                         f"model by {expect} ** -0.5")
    if name == "GEMMA2":
        p.add("add_attn_logit_softcapping", c.attn_softcap or 0.0)
    elif c.attn_softcap is not None:
        raise BuildError(f"{where}: attention soft-capping, which llama.cpp's gemma3 does not have")
    p.add("add_final_logit_softcapping", c.final_softcap or 0.0)
    windows = [b.attn.window for b in blocks]
    sizes = {w for w in windows if w is not None}
    if len(sizes) > 1:
        raise BuildError(f"{where}: sliding windows of different sizes {sorted(sizes)}; llama.cpp has one")
    if sizes:
        p.add("add_sliding_window", sizes.pop())
        p.add("add_sliding_window_pattern", [w is not None for w in windows])
    elif name == "GEMMA2":
        raise BuildError(f"{where}: no sliding layers; llama.cpp's gemma2 always slides every other layer")


def _block(out, T, i: int, b, ckpt: dict[str, str], arch: Arch, name: str, norm, c, shared_count: int) -> None:
    """Layer i's tensors, in llama.cpp's order and layout."""
    a = b.attn
    q_rows, kv_rows = a.heads * a.head_dim, a.kv_heads * a.head_dim
    out(T.ATTN_NORM, ckpt["input_layernorm.weight"], (c.hidden,), i, norm)
    perm_q = (lambda ts, n=a.heads: _permute(ts[0], n)) if arch.permute_qk else None
    perm_k = (lambda ts, n=a.kv_heads: _permute(ts[0], n)) if arch.permute_qk else None
    if a.fused:  # checked unbiased and unpermuted (NEOX) in the plan
        out(T.ATTN_QKV, ckpt["self_attn.qkv_proj.weight"], (q_rows + 2 * kv_rows, c.hidden), i)
    else:
        out(T.ATTN_Q, ckpt["self_attn.q_proj.weight"], (q_rows, c.hidden), i, perm_q)
        out(T.ATTN_K, ckpt["self_attn.k_proj.weight"], (kv_rows, c.hidden), i, perm_k)
        out(T.ATTN_V, ckpt["self_attn.v_proj.weight"], (kv_rows, c.hidden), i)
    if a.qkv_bias:
        out(T.ATTN_Q, ckpt["self_attn.q_proj.bias"], (q_rows,), i, perm_q, ".bias")
        out(T.ATTN_K, ckpt["self_attn.k_proj.bias"], (kv_rows,), i, perm_k, ".bias")
        out(T.ATTN_V, ckpt["self_attn.v_proj.bias"], (kv_rows,), i, None, ".bias")
    out(T.ATTN_OUT, ckpt["self_attn.o_proj.weight"], (c.hidden, q_rows), i)
    if a.o_bias:
        out(T.ATTN_OUT, ckpt["self_attn.o_proj.bias"], (c.hidden,), i, None, ".bias")
    if a.qk_norm:
        out(T.ATTN_Q_NORM, ckpt["self_attn.q_norm.weight"], (a.head_dim,), i, norm)
        out(T.ATTN_K_NORM, ckpt["self_attn.k_norm.weight"], (a.head_dim,), i, norm)
    if b.sandwich:
        out(T.ATTN_POST_NORM, ckpt["post_attention_layernorm.weight"], (c.hidden,), i, norm)
        out(T.FFN_PRE_NORM, ckpt["pre_feedforward_layernorm.weight"], (c.hidden,), i, norm)
    else:
        out(T.FFN_NORM, ckpt["post_attention_layernorm.weight"], (c.hidden,), i, norm)
    f = b.ffn
    if isinstance(f, DenseFFN):
        w = f.intermediate
        if f.fused:
            out(T.FFN_UP, ckpt["mlp.gate_up_proj.weight"], (2 * w, c.hidden), i)
        else:
            out(T.FFN_GATE, ckpt["mlp.gate_proj.weight"], (w, c.hidden), i)
            out(T.FFN_UP, ckpt["mlp.up_proj.weight"], (w, c.hidden), i)
        out(T.FFN_DOWN, ckpt["mlp.down_proj.weight"], (c.hidden, w), i)
        if f.bias:
            if name != "LLAMA":
                raise BuildError(f"--format gguf (llama.cpp {name.lower()}): layer {i} has MLP biases, which it does "
                                 "not have")
            out(T.FFN_GATE, ckpt["mlp.gate_proj.bias"], (w,), i, None, ".bias")
            out(T.FFN_UP, ckpt["mlp.up_proj.bias"], (w,), i, None, ".bias")
            out(T.FFN_DOWN, ckpt["mlp.down_proj.bias"], (c.hidden,), i, None, ".bias")
        if b.sandwich:
            out(T.FFN_POST_NORM, ckpt["post_feedforward_layernorm.weight"], (c.hidden,), i, norm)
    else:
        n, w = f.router.experts, f.intermediate
        out(T.FFN_GATE_INP, ckpt["mlp.gate.weight"], (n, c.hidden), i)
        stack = lambda ts: _stack(ts)
        for t, proj, shape in ((T.FFN_GATE_EXP, "gate_proj", (n, w, c.hidden)),
                               (T.FFN_UP_EXP, "up_proj", (n, w, c.hidden)),
                               (T.FFN_DOWN_EXP, "down_proj", (n, c.hidden, w))):
            out(t, [ckpt[f"mlp.experts.{e}.{proj}.weight"] for e in range(n)], shape, i, stack)
        if name == "QWEN2MOE":
            s = f.shared.intermediate
            out(T.FFN_GATE_INP_SHEXP, ckpt["mlp.shared_expert_gate.weight"], (c.hidden,), i,
                lambda ts: ts[0].reshape(-1))
            out(T.FFN_GATE_SHEXP, ckpt["mlp.shared_expert.gate_proj.weight"], (s, c.hidden), i)
            out(T.FFN_UP_SHEXP, ckpt["mlp.shared_expert.up_proj.weight"], (s, c.hidden), i)
            out(T.FFN_DOWN_SHEXP, ckpt["mlp.shared_expert.down_proj.weight"], (c.hidden, s), i)
        elif name == "DEEPSEEK":
            s = f.shared.intermediate if f.shared is not None else 0
            width = shared_count * w
            keys = (lambda proj: (ckpt[f"mlp.shared_expert.{proj}.weight"],) if s else ())
            out(T.FFN_GATE_SHEXP, keys("gate_proj"), (width, c.hidden), i,
                lambda ts, s=s, width=width: _pad(ts, (s, c.hidden), 0, width))
            out(T.FFN_UP_SHEXP, keys("up_proj"), (width, c.hidden), i,
                lambda ts, s=s, width=width: _pad(ts, (s, c.hidden), 0, width))
            # transformers: sigmoid(0) * shared(x) = 1/2 * shared(x); llama.cpp's deepseek adds shared(x).
            out(T.FFN_DOWN_SHEXP, keys("down_proj"), (c.hidden, width), i,
                lambda ts, s=s, width=width: _pad([t * 0.5 for t in ts], (c.hidden, s), 1, width))


def _permute(w, n_head: int):
    """Hugging Face's rotate-half q/k rows -> llama.cpp's interleaved pairs (the converter's permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _stack(ts):
    import torch

    return torch.stack(ts)


def _plus_one(ts):
    """Gemma's norm weight w as llama.cpp's w' with w' * x = (1 + w) * x, in float32 as transformers adds it."""
    import torch

    return ts[0].to(torch.float32) + 1.0


def _pad(ts, shape, dim: int, width: int):
    """The tensor (or none: zero width) padded with zeros along `dim` to `width`: rows/columns that add 0."""
    import torch

    dtype = ts[0].dtype if ts else torch.float32
    base = ts[0] if ts else torch.zeros(shape, dtype=dtype)
    missing = list(base.shape)
    missing[dim] = width - base.shape[dim]
    return torch.cat([base, torch.zeros(missing, dtype=base.dtype)], dim=dim) if missing[dim] else base


def _tensor(values):
    import torch

    return torch.tensor(values, dtype=torch.float32)


# -- writing -----------------------------------------------------------------------------------------------

def _zero_gate(gate, read) -> bool:
    """Whether a shared-expert gate is all zeros (an always-on shared expert behind sigmoid(0) = 1/2): compose's
    own `zeros`, or, with `read`, any expression whose values are zero. A DeepSeekMoE output loaded back as a
    source (to be merged, stacked or written again) has its gate as a Load of zeros, and written as qwen2moe it
    would give NaN in llama.cpp like the Zeros it came from. Gates are one row per layer: cheap to evaluate."""
    if gate is None or isinstance(gate, Zeros):
        return gate is not None
    if read is None:
        return False
    from compose.ir.evaluate import Evaluator

    return not bool(Evaluator([gate], read)(gate).any())


def write(g: Graph, folder: Path, *, checkpoint: Callable, planned: Plan, into: Path | None = None) -> dict:
    """Write `folder/model.gguf` (or `into/model.gguf`) from the hf checkpoint in `folder` (written by the hf
    backend for `g`), whose tensors `checkpoint(name)` reads one at a time (the front door's reader of a
    model folder); return what compose.json records. `planned` is `plan(g, ...)`, made before the build
    wrote anything."""
    import gguf
    import numpy as np
    import torch

    p = planned
    dtype = g.config.dtype
    arch = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[p.arch]]
    w = gguf.GGUFWriter((into or folder) / FILE, arch)
    w.add_name("compose build")
    for method, args in p.meta:
        getattr(w, method)(*args)
    # decided again on the build's own copy: a merged tokenizer's files exist only once the build wrote them
    tokenizer = gguf_vocab.write(w, folder, g.config.vocab)
    qtypes = []
    for t in p.tensors:
        kind = "F32" if t.f32 else _GGML[dtype]
        qtype = getattr(gguf.GGMLQuantizationType, kind)
        size = 4 if kind == "F32" else 2
        np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[kind]
        w.add_tensor_info(t.name, t.shape, np.dtype(np_dtype), math.prod(t.shape) * size,
                          raw_dtype=qtype if kind == "BF16" else None)
        qtypes.append(kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for t, kind in zip(p.tensors, qtypes):
        try:
            data = [checkpoint(k) for k in t.keys]
        except KeyError as e:
            raise BuildError(f"--format gguf: the hf checkpoint has no tensor {e.args[0]}") from None
        x = t.make(data) if t.make is not None else data[0]
        if tuple(x.shape) != t.shape:
            raise BuildError(f"--format gguf: tensor {t.name} came out {tuple(x.shape)}, expected {t.shape} "
                             f"(from {', '.join(t.keys)})")
        x = x.contiguous()
        if kind == "F32":
            arr = x.to(torch.float32).numpy()
        elif kind == "F16":
            arr = x.to(torch.float16).numpy()
        else:
            arr = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        w.write_tensor_data(arr)
        del data, x, arr
    w.close()
    return {"files": [FILE], "architecture": arch, "tensors": len(p.tensors), "tokenizer": tokenizer}
