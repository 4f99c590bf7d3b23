"""What a model family is, and the parts most families share.

A family module is the one place that knows a model family: how its config.json reads into the typed
ArchConfig, its tensor names on disk and how they map to the IR's, the transformers class it is written
as and the config.json written for a graph, the tiny built-in recipe, and the features the generated code
needs. The IR's names are Hugging Face's local names for a dense block (`self_attn.q_proj.weight`,
`mlp.gate_proj.weight`) and Qwen2-MoE's for a mixture of experts (`mlp.gate.weight`,
`mlp.experts.3.down_proj.weight`, `mlp.shared_expert.*`), so most families map them one to one.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Protocol

from compose.errors import BuildError, SourceError
from compose.families.rope import legacy_rope, read_rope
from compose.ir.config import ArchConfig
from compose.ir.graph import Graph
from compose.ir.nodes import Attention, DecoderBlock, DenseFFN, Embedding, LMHead, MoE, Norm, Op, Origin
from compose.ir.weights import Expr, Zeros

Shape = tuple[int, ...]
Parts = list[tuple[bool, dict[str, Expr]]]
"""(trains, checkpoint name -> expression) per op, in file order."""


class Reader(Protocol):
    """A checkpoint seen by name: what a family reads a source through (lowering gives one per source)."""

    def has(self, key: str) -> bool: ...

    def load(self, key: str, shape: Shape) -> Expr:
        """The tensor `key`, which the family expects to have `shape` (the verifier checks it later)."""


@dataclass(frozen=True)
class Features:
    """What the generated code must do differently for a family: the templates read these, and the
    renderer refuses a value its templates do not implement, by name."""

    norm: str = "rms"
    """`rms`: weight * x / rms(x), in float32 and cast back before the gain (Llama's RMSNorm);
    `offset_rms`: x / rms(x) * (1 + weight), all in float32 and cast back at the end (Gemma's)."""
    embed_scale: bool = False
    """Embeddings multiplied by sqrt(hidden), that number first rounded to the model's dtype (Gemma)."""
    mlp: str = "gated"
    """`gated`: down(act(gate(x)) * up(x))."""
    attention: str = "rope"
    """`rope`: causal (optionally sliding-window) self-attention with rotary positions, grouped KV heads."""
    moe_shared_gate: bool = False
    """A shared expert behind sigmoid(shared_expert_gate(x)) in every MoE layer (Qwen2-MoE)."""
    moe_weights_in_model_dtype: bool = False
    """Routing weights cast to the model's dtype before they weight the experts (Qwen2-MoE)."""


FILE_KEYS = ("architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
             "auto_map", "num_hidden_layers", "_commit_hash")
"""config.json keys about the file, not the model: read where needed, never carried into an output (a
source's auto_map would make transformers run the source's code for a plain class)."""

COMMON_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
               "rope_parameters", "partial_rotary_factor", "original_max_position_embeddings",
               "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
"""The keys every family interprets."""


def file_fields(dtype: str) -> dict:
    """config.json's fields about the file every output writes: the dtype under transformers 5's name
    (`dtype`) and 4.x's (`torch_dtype`), and the transformers version it was written for (the installed
    one, which the Hub and transformers' own warnings read)."""
    return {"dtype": dtype, "torch_dtype": dtype, "transformers_version": transformers_version()}


@functools.cache
def transformers_version() -> str:
    from importlib.metadata import version

    return version("transformers")


def int_field(c: dict, key: str, where: str, default=None, minimum: int = 1) -> int:
    """An integer >= minimum (a bool, a string or a float is refused, naming the key); null is the default."""
    v = c.get(key)
    v = default if v is None else v
    if v is None:
        raise SourceError(f"{where}: config.json lacks {key}")
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise SourceError(f"{where}: config.json {key} must be an integer >= {minimum}, got {v!r}")
    return v


def number_field(c: dict, key: str, default: float, where: str) -> float:
    """A non-negative finite number (a rate, a coefficient); null means the default."""
    v = c.get(key, default)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SourceError(f"{where}: config.json {key} must be a non-negative number, got {v!r}")
    return float(v)


def _token_id(c: dict, key: str, where: str):
    v = c.get(key)
    if v is None:
        return None
    if isinstance(v, list) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return tuple(v) if len(v) > 1 else v[0]
    if isinstance(v, bool) or not isinstance(v, int):
        raise SourceError(f"{where}: config.json {key} must be a token id, got {v!r}")
    return v


def fill(op: Op, reader: Reader, prefix: str):
    """`op` (built without weights) with each weight it expects loaded from `prefix + its IR name`."""
    return dataclasses.replace(op, weights=tuple((k, reader.load(prefix + k, s)) for k, s in op.expected().items()))


def moe_blocks(g: Graph) -> list[tuple[int, MoE]]:
    """(layer index, MoE) of every mixture-of-experts layer of the main chain (a derived family's layers are
    not typed: none)."""
    return [(i, b.ffn) for i, (_, b) in enumerate(g.blocks()) if isinstance(b, DecoderBlock) and isinstance(b.ffn, MoE)]


class Family:
    """One model family (one config.json model_type). Subclasses set the class attributes and override
    the hooks where the family differs from a Llama-like dense decoder."""

    model_type: ClassVar[str]
    architecture: ClassVar[str]
    """The transformers class a graph of this family is written as."""
    dense: ClassVar[str]
    """The family whose attention, norms and embeddings these are (itself, for a dense family)."""
    moe_targets: ClassVar[tuple[str, ...]] = ()
    """A dense family's mixture-of-experts families, in order of preference: the first that holds an MoE
    graph of this family writes it (and the generated-code target, compose_moe, when none does)."""
    derived: ClassVar[bool] = False
    """Read from transformers' own class (compose.families.derived), not written by hand."""
    generated: ClassVar[bool] = False
    """Written as compose's generated modeling code behind an `auto_map`, not as a transformers class."""
    mergekit_moe: ClassVar[frozenset[str]] = frozenset()
    """The mergekit-moe output architectures that take this family's models as experts (each writer's
    `supports_config` in mergekit/moe/, 0.1.5)."""
    gguf_arch: ClassVar[str | None] = None
    """llama.cpp's architecture for this family's class (`general.architecture` of the GGUF file compose
    writes, as llama.cpp's convert_hf_to_gguf.py maps the class); None: compose writes no GGUF for it."""
    features: ClassVar[Features] = Features()
    qk_norm: ClassVar[bool] = False
    """Every attention normalises its query and key heads (`self_attn.q_norm`, `k_norm`)."""
    fused: ClassVar[bool] = False
    """q/k/v and gate/up are one matrix each (`qkv_proj`, `gate_up_proj`), in the checkpoint and the IR."""
    sandwich: ClassVar[bool] = False
    """Every block also normalises its attention's and its FFN's outputs (Gemma 2 and 3)."""
    act_key: ClassVar[str] = "hidden_act"
    """The config.json field of the MLP's activation."""
    default_act: ClassVar[str] = "silu"
    default_theta: ClassVar[float] = 10000.0
    """transformers' default rope theta for this family, when config.json gives none."""
    default_max_positions: ClassVar[int] = 2048
    keys: ClassVar[tuple[str, ...]] = ()
    """The family's own config.json keys, on top of COMMON_KEYS: interpreted, so not carried."""
    tiny_name: ClassVar[str | None] = None
    """`tiny:<name>` of the built-in tiny model, when it is not the model_type."""
    tiny_options: ClassVar[dict[str, int] | None] = None
    """The options `tiny:<family>` takes beyond the common ones, with their defaults (None: no tiny recipe)."""
    expert_prefix: ClassVar[str | None] = None
    """Where a mixture-of-experts family keeps a layer's router and experts on disk (`mlp`,
    `block_sparse_moe`); None for a family without experts."""
    expert_names: ClassVar[dict[str, str]] = {"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
    """IR projection -> the family's per-expert checkpoint name for it."""

    # -- config.json -> ArchConfig ----------------------------------------------------------------------
    def biases(self, c: dict, where: str) -> tuple[bool, bool, bool]:
        """(q/k/v biases, o_proj bias, MLP biases)."""
        return False, False, False

    def window(self, c: dict, i: int, where: str) -> int | None:
        """Layer i's sliding window (None: it attends to every earlier token)."""
        return None

    def stored_dtype(self, c: dict) -> str | None:
        return c.get("dtype") or c.get("torch_dtype")

    def arch_config(self, c: dict, where: str, dtype: str) -> ArchConfig:
        """The typed config of config.json `c` (`where` names the source in errors), written as `dtype`."""
        if c.get("quantization_config") is not None:
            raise SourceError(f"{where}: a quantized checkpoint (quantization_config); compose reads float weights")
        heads = int_field(c, "num_attention_heads", where)
        hidden = int_field(c, "hidden_size", where)
        kv_heads = int_field(c, "num_key_value_heads", where, default=heads)
        if heads % kv_heads:
            raise SourceError(f"{where}: config.json num_attention_heads {heads} is not a multiple of "
                              f"num_key_value_heads {kv_heads}")
        head_dim = c.get("head_dim") or (hidden // heads)
        if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
            raise SourceError(f"{where}: config.json head_dim must be a positive integer, got {head_dim!r}")
        eps = c.get("rms_norm_eps", 1e-6)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise SourceError(f"{where}: config.json rms_norm_eps must be a number in (0, 1), got {eps!r}")
        act = c.get(self.act_key) or self.default_act
        if not isinstance(act, str):
            raise SourceError(f"{where}: config.json {self.act_key} must be a name, got {act!r}")
        tie = c.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise SourceError(f"{where}: config.json tie_word_embeddings must be true or false, got {tie!r}")
        qkv_bias, o_bias, mlp_bias = self.biases(c, where)
        interpreted = set(FILE_KEYS) | set(COMMON_KEYS) | set(self.keys)
        return ArchConfig(
            family=self.dense, vocab=int_field(c, "vocab_size", where), hidden=hidden,
            intermediate=int_field(c, "intermediate_size", where), heads=heads, kv_heads=kv_heads, head_dim=head_dim,
            rms_eps=float(eps), rope=self.rope(c, where),
            max_positions=int_field(c, "max_position_embeddings", where, default=self.default_max_positions),
            tie_embeddings=tie, qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, act=act, dtype=dtype,
            bos_token_id=_token_id(c, "bos_token_id", where), eos_token_id=_token_id(c, "eos_token_id", where),
            pad_token_id=_token_id(c, "pad_token_id", where),
            extra=tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in c.items() if k not in interpreted)),
            **self.attention_config(c, where),
        )

    def source_family(self, c: dict, where: str) -> Family:
        """The family that reads a checkpoint of config.json `c` (itself, except for outputs whose reading
        depends on what they say, like compose_moe's)."""
        return self

    def attention_config(self, c: dict, where: str) -> dict:
        """The family's own ArchConfig attention fields (query_scale, soft-caps, local_rope), read from `c`."""
        return {}

    def rope(self, c: dict, where: str):
        return read_rope(c, self.default_theta, where)

    # -- source -> IR ------------------------------------------------------------------------------------
    def embedding(self, cfg: ArchConfig, reader: Reader) -> Embedding:
        return fill(Embedding(weights=(), vocab=cfg.vocab, hidden=cfg.hidden), reader, "model.embed_tokens.")

    def final_norm(self, cfg: ArchConfig, reader: Reader) -> Norm:
        return fill(Norm(weights=(), dim=cfg.hidden, eps=cfg.rms_eps), reader, "model.norm.")

    def head(self, cfg: ArchConfig, reader: Reader, embed: Embedding) -> LMHead:
        head = LMHead(weights=(), vocab=cfg.vocab, hidden=cfg.hidden, tied=cfg.tie_embeddings)
        if cfg.tie_embeddings:
            return dataclasses.replace(head, weights=(("weight", embed.params()["weight"]),))
        return fill(head, reader, "lm_head.")

    def block(self, c: dict, cfg: ArchConfig, i: int, reader: Reader, origin: Origin) -> DecoderBlock:
        """Layer i of the checkpoint."""
        p = f"model.layers.{i}."

        def norm(name: str) -> Norm:
            return fill(Norm(weights=(), dim=cfg.hidden, eps=cfg.rms_eps), reader, p + name + ".")

        attn = Attention(weights=(), hidden=cfg.hidden, heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                         qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, window=self.window(c, i, origin.source),
                         qk_norm=self.qk_norm, fused=self.fused)
        if self.sandwich:  # Gemma's names: its post_attention_layernorm normalises the attention's output
            return DecoderBlock(input_norm=norm("input_layernorm"), attn=fill(attn, reader, p + "self_attn."),
                                attn_out_norm=norm("post_attention_layernorm"),
                                post_norm=norm("pre_feedforward_layernorm"),
                                ffn=self.ffn(c, cfg, i, reader, p + "mlp.", origin.source),
                                ffn_out_norm=norm("post_feedforward_layernorm"), origin=origin)
        return DecoderBlock(
            input_norm=norm("input_layernorm"),
            attn=fill(attn, reader, p + "self_attn."),
            post_norm=norm("post_attention_layernorm"),
            ffn=self.ffn(c, cfg, i, reader, p + "mlp.", origin.source),
            origin=origin,
        )

    def ffn(self, c: dict, cfg: ArchConfig, i: int, reader: Reader, prefix: str, where: str) -> DenseFFN | MoE:
        """Layer i's feed-forward part, under `prefix` (`model.layers.3.mlp.`)."""
        return fill(DenseFFN(weights=(), hidden=cfg.hidden, intermediate=cfg.intermediate, act=cfg.act,
                             bias=cfg.mlp_bias, fused=self.fused), reader, prefix)

    # -- IR -> checkpoint --------------------------------------------------------------------------------
    def refuse(self, g: Graph) -> str | None:
        """Why this family's class cannot hold `g` exactly (None: it can). The target pass asks before
        anything is written."""
        if moe_blocks(g):
            return f"{self.architecture} has no mixture-of-experts layers"
        return self.refuse_attention(g)

    def refuse_attention(self, g: Graph) -> str | None:
        """The attention checks every family makes: its biases and sliding windows."""
        qkv, o, mlp = self.biases_of(g)
        for name, b in g.blocks():
            if b.attn.fused != self.fused or (isinstance(b.ffn, DenseFFN) and b.ffn.fused != self.fused):
                return (f"node {name}: {'fused' if b.attn.fused else 'separate'} projections, but {self.architecture} "
                        f"has {'fused' if self.fused else 'separate'} ones")
            if b.sandwich != self.sandwich:
                return (f"node {name}: {'' if b.sandwich else 'no '}output norms on its sublayers, but "
                        f"{self.architecture} has {'them' if self.sandwich else 'none'}")
            if b.attn.qk_norm != self.qk_norm:
                return (f"node {name}: {'a' if b.attn.qk_norm else 'no'} q/k norm, but {self.architecture} has "
                        f"{'one' if self.qk_norm else 'none'}")
            if (b.attn.qkv_bias, b.attn.o_bias) != (qkv, o):
                return (f"node {name}: q/k/v bias {b.attn.qkv_bias} and o_proj bias {b.attn.o_bias}, but "
                        f"{self.architecture} has {qkv} and {o}")
            if isinstance(b.ffn, DenseFFN) and b.ffn.bias != mlp:
                return f"node {name}: MLP bias {b.ffn.bias}, but {self.architecture} has {mlp}"
        return self.refuse_windows(g)

    def biases_of(self, g: Graph) -> tuple[bool, bool, bool]:
        """The biases this family's class has for a graph like `g` (a flag in config.json, or fixed)."""
        c = g.config
        return c.qkv_bias, c.o_bias, c.mlp_bias

    def refuse_windows(self, g: Graph) -> str | None:
        for name, b in g.blocks():
            if b.attn.window is not None:
                return f"node {name}: a sliding window of {b.attn.window}, which {self.architecture} does not have"
        return None

    def tensor_dtype(self, g: Graph, name: str) -> str:
        """The dtype output tensor `name` is written in: the model's."""
        return g.config.dtype

    def class_name(self, g: Graph) -> str:
        """The transformers class `g` is written as."""
        return self.architecture

    def prepare(self, g: Graph) -> Graph:
        """`g` with the weight rewrites writing it as this class needs (as expressions a dump shows)."""
        return g

    def tensors(self, g: Graph) -> Parts:
        """Every output tensor under its checkpoint name, grouped by the op it belongs to, in file order."""
        out: Parts = [(bool(g.embedding.trainable), {"model.embed_tokens.weight": g.embedding.params()["weight"]})]
        for i, (_, b) in enumerate(g.blocks()):
            out += self.block_parts(f"model.layers.{i}.", b)
        out.append((bool(g.final_norm.trainable), {"model.norm.weight": g.final_norm.params()["weight"]}))
        if not g.head.tied:
            out.append((bool(g.head.trainable), {"lm_head.weight": g.head.params()["weight"]}))
        return out

    def block_parts(self, prefix: str, b: DecoderBlock) -> Parts:
        return [(bool(b.trainable), self.block_names(prefix, b))]

    def block_names(self, prefix: str, b: DecoderBlock) -> dict[str, Expr]:
        """A block's weights under this family's checkpoint names."""
        return {prefix + k: e for k, e in b.params().items()}

    def config_json(self, g: Graph) -> dict:
        """config.json for `g` written as this class: the carried fields, then every typed one."""
        c = g.config
        readable = self.readable_keys()
        out = {k: v for k, v in c.carried().items() if k in readable}
        out.update(
            architectures=[self.architecture], model_type=self.model_type, vocab_size=c.vocab, hidden_size=c.hidden,
            intermediate_size=c.intermediate, num_hidden_layers=len(g.blocks()), num_attention_heads=c.heads,
            num_key_value_heads=c.kv_heads, head_dim=c.head_dim, **{self.act_key: c.act},
            max_position_embeddings=c.max_positions, rms_norm_eps=c.rms_eps, tie_word_embeddings=c.tie_embeddings,
            **file_fields(c.dtype), **c.token_ids())
        out.update(self.rope_config(g))
        out.update(self.own_config(g))
        return out

    def rope_config(self, g: Graph) -> dict:
        """config.json's rope fields for `g`: transformers 5's `rope_parameters`, and the keys transformers
        4.x reads instead (`rope_theta`, `rope_scaling`), which say the same."""
        c = g.config
        return {"rope_parameters": c.rope.to_json(), **legacy_rope(c.rope, c.max_positions)}

    def own_config(self, g: Graph) -> dict:
        """The family's own config.json fields for `g`."""
        return {}

    def readable_keys(self) -> frozenset[str]:
        """The config.json fields the written class reads: its transformers config class's arguments. A
        source's other fields (another tool's settings, code references) are not carried into an output."""
        return _config_arguments(self.model_type)

    # -- tiny built-in models ----------------------------------------------------------------------------
    def tiny_config(self, o: dict[str, int]) -> dict:
        """config.json of `tiny:<family>` with options `o` (the common ones and `tiny_options`)."""
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": o["vocab"],
            "hidden_size": o["hidden"], "intermediate_size": o["intermediate"], "num_hidden_layers": o["layers"],
            "num_attention_heads": o["heads"], "num_key_value_heads": o["kv_heads"],
            "head_dim": o["hidden"] // o["heads"], "hidden_act": "silu", "max_position_embeddings": 512,
            "rms_norm_eps": 1e-6, "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": bool(o["tie"]), "bos_token_id": 1, "eos_token_id": 2,
            "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": "float32",
        }

    def checkpoint_shapes(self, c: dict, where: str) -> dict[str, Shape]:
        """Every tensor a checkpoint of config.json `c` holds, with its shape, in file order: what a reader
        of this family asks a source for."""
        cfg = self.arch_config(c, where, "float32")
        rec = _Recorder()
        embed = self.embedding(cfg, rec)
        for i in range(int_field(c, "num_hidden_layers", where)):
            self.block(c, cfg, i, rec, Origin(where, i))
        self.final_norm(cfg, rec)
        self.head(cfg, rec, embed)
        return rec.shapes

    # -- training ----------------------------------------------------------------------------------------
    def in_memory_name(self, name: str) -> str | None:
        """The parameter name a checkpoint tensor has once loaded, when transformers 5 (and the generated
        module) hold it differently; None when it is the same."""
        return None if self.expert_prefix is None else stacked_name(name, self.expert_prefix, self.expert_names)


def stacked_name(name: str, prefix: str, names: dict[str, str]) -> str | None:
    """`...<prefix>.experts.E.<name>.weight` -> `...mlp.experts.gate_up_proj` or `...mlp.experts.down_proj`
    (transformers 5 stacks the experts when it loads them, and the generated module holds them so);
    `...<prefix>.<rest>` -> `...mlp.<rest>`; None for a name that stays as it is."""
    if f".{prefix}." not in name:
        return None
    out = name.replace(f".{prefix}.", ".mlp.")
    proj = {v: k for k, v in names.items()}
    m = re.fullmatch(r"(.*\.experts)\.\d+\.(\w+)\.weight", out)
    if m and m[2] in proj:
        out = f"{m[1]}.{'down_proj' if proj[m[2]] == 'down_proj' else 'gate_up_proj'}"
    return out if out != name else None


class _Recorder:
    """A Reader that has nothing and records what is asked of it (for checkpoint_shapes)."""

    def __init__(self) -> None:
        self.shapes: dict[str, Shape] = {}

    def has(self, key: str) -> bool:
        return False

    def load(self, key: str, shape: Shape) -> Expr:
        self.shapes[key] = tuple(shape)
        return Zeros(tuple(shape), "float32")


def refuse_unless_one_window(g: Graph, architecture: str) -> str | None:
    """A class with one model-wide sliding window (Mistral, Mixtral): every layer the same, or none."""
    windows = {b.attn.window for _, b in g.blocks()}
    if len(windows) > 1:
        return f"its layers have different sliding windows {sorted(windows, key=str)}; {architecture} has one"
    return None


def one_window_size(g: Graph, architecture: str) -> str | None:
    """A class with per-layer sliding or full attention but one window size (Qwen2, Qwen2-MoE)."""
    sizes = {b.attn.window for _, b in g.blocks()} - {None}
    if len(sizes) > 1:
        return f"its sliding layers have different windows {sorted(sizes)}; {architecture} has one size"
    return None


def model_window(c: dict, where: str) -> int | None:
    """The one sliding window of every layer (Mistral, Mixtral): `sliding_window`, or none when null."""
    return None if c.get("sliding_window") is None else int_field(c, "sliding_window", where)


def layer_types_config(g: Graph) -> dict:
    """Qwen2's per-layer attention fields for `g`: layer_types from each block's window, and the
    use_sliding_window / sliding_window / max_window_layers that agree with them."""
    windows = [b.attn.window for _, b in g.blocks()]
    size = next((w for w in windows if w is not None), None)
    leading_full = next((i for i, w in enumerate(windows) if w is not None), len(windows))
    return {"use_sliding_window": size is not None, "sliding_window": size, "max_window_layers": leading_full,
            "layer_types": ["full_attention" if w is None else "sliding_attention" for w in windows]}


LAYER_TYPES = ("full_attention", "sliding_attention")
"""config.json's per-layer attention kinds (`layer_types`), as transformers names them."""


def layer_types(c: dict, where: str) -> list[str] | None:
    """config.json's layer_types, checked to name one of LAYER_TYPES per layer; None when it is absent."""
    types = c.get("layer_types")
    if types is None:
        return None
    n = int_field(c, "num_hidden_layers", where)
    if not isinstance(types, list) or len(types) != n or not set(types) <= set(LAYER_TYPES):
        raise SourceError(f"{where}: config.json layer_types must list full_attention or sliding_attention for each "
                          f"of the {n} layers")
    return types


def qwen2_window(c: dict, i: int, where: str) -> int | None:
    """Layer i's window under Qwen2's rules: sliding when use_sliding_window is on and the layer is a
    `sliding_attention` one (layer_types, else layers from max_window_layers on)."""
    if not c.get("use_sliding_window"):
        return None
    size = int_field(c, "sliding_window", where)
    types = layer_types(c, where)
    if types is None:
        return size if i >= int_field(c, "max_window_layers", where, default=28, minimum=0) else None
    return size if types[i] == "sliding_attention" else None


def refuse_all(candidates: list[Family], g: Graph) -> Family:
    """The first family that holds `g`, or a BuildError naming why each one cannot."""
    if not candidates:
        raise BuildError(f"no transformers class holds this model: compose writes no {g.config.family} model "
                         "with mixture-of-experts layers yet")
    reasons = []
    for fam in candidates:
        why = fam.refuse(g)
        if why is None:
            return fam
        reasons.append(f"{fam.architecture}: {why}")
    raise BuildError("no transformers class holds this model exactly (" + "; ".join(reasons) + ")")


@functools.cache
def _config_arguments(model_type: str) -> frozenset[str]:
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    names = set(inspect.signature(CONFIG_MAPPING[model_type].__init__).parameters)
    return frozenset(names - {"self", "kwargs"} - set(FILE_KEYS))
