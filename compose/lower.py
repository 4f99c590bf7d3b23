"""Lowering: a spec tree -> an architecture Graph whose every weight is an expression.

Each spec op is one function from Graph(s) to Graph; errors name the spec field (`model.model.groups`).
Nothing here reads tensor data: sources are opened for their configs and safetensors headers only.
"""
from __future__ import annotations

import dataclasses
import json

from compose.errors import SourceError, SpecError
from compose.ir import ArchConfig, Attention, DecoderBlock, DenseFFN, Embedding, Graph, LMHead, Load, Norm, Origin, Zeros
from compose.ir.nodes import make
from compose.sources import MOE_FAMILIES, Source, open_source
from compose.spec import (DTYPES, CalmSpec, ExpandSpec, LayersSpec, LoadSpec, MergeSpec, MoESpec, StackSpec,
                          UpscaleSpec, VisualExpertSpec)


def lower(spec, path: str = "model") -> Graph:
    if isinstance(spec, LoadSpec):
        return lower_load(spec, path)
    if isinstance(spec, ExpandSpec):
        return expand_blocks(lower_one(spec.model, f"{path}.model"), spec, path)
    if isinstance(spec, UpscaleSpec):
        return depth_upscale(lower_one(spec.model, f"{path}.model"), spec.drop, path)
    if isinstance(spec, LayersSpec):
        return take_layers(lower_one(spec.model, f"{path}.model"), spec.start, spec.stop, path)
    if isinstance(spec, StackSpec):
        return stack([lower_one(s, f"{path}.slices[{i}]") for i, s in enumerate(spec.slices)], path)
    if isinstance(spec, MergeSpec):
        from compose.lower_merge import lower_merge

        return lower_merge(spec, path)
    if isinstance(spec, MoESpec):
        from compose.lower_moe import lower_moe

        return lower_moe(spec, path)
    if isinstance(spec, CalmSpec):
        from compose.lower_calm import lower_calm

        return lower_calm(spec, path)
    if isinstance(spec, VisualExpertSpec):
        from compose.lower_vision import lower_visual_expert

        return lower_visual_expert(spec, path)
    raise SpecError(f"{path}: expected a model (load, expand_blocks, depth_upscale, layers, stack, merge, moe), "
                    f"got {type(spec).__name__}")


# -- load ------------------------------------------------------------------------------------------------

def arch_config(src: Source, dtype: str | None) -> ArchConfig:
    c = src.config
    # An MoE checkpoint's attention, norms and embeddings are those of a dense family.
    family = {"mixtral": "mistral", "qwen2_moe": "qwen2"}.get(c.get("model_type"), c.get("model_type"))
    try:
        heads = int(c["num_attention_heads"])
        hidden = int(c["hidden_size"])
        rope = c.get("rope_parameters") or {"rope_theta": c.get("rope_theta", 10000.0),
                                             **(c.get("rope_scaling") or {"rope_type": "default"})}
        if family == "qwen2" and c.get("use_sliding_window"):
            raise SourceError(f"{src.ref}: Qwen2 with use_sliding_window is not supported yet")
        window = c.get("sliding_window") if family == "mistral" else None
        return ArchConfig(
            family=family, vocab=int(c["vocab_size"]), hidden=hidden,
            intermediate=int(c["intermediate_size"]), heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or hidden // heads), rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope=tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (list, dict)))),
            max_positions=int(c.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=bool(c.get("qkv_bias", True)) if c["model_type"] == "qwen2_moe"
            else c["model_type"] == "qwen2" or bool(c.get("attention_bias", False)),
            sliding_window=int(window) if window else None,
            act=c.get("hidden_act", "silu"),
            dtype=_dtype(src, dtype),
            hf_config=json.dumps(c, sort_keys=True),
        )
    except KeyError as e:
        raise SourceError(f"{src.ref}: config.json lacks {e.args[0]}") from None


def _dtype(src: Source, asked: str | None) -> str:
    """The output dtype: asked for in the spec, else the config's, else the embedding's on disk."""
    d = asked or src.config.get("dtype") or src.config.get("torch_dtype") or src.meta("model.embed_tokens.weight")[1]
    if d not in DTYPES:
        raise SourceError(f"{src.ref}: weights of dtype {d!r}; compose writes float32, bfloat16 or float16 "
                          "(pick one with dtype=...)")
    return d


def _loads(src: Source, prefix: str, names: list[str], path: str) -> dict:
    out = {}
    for n in names:
        key = prefix + n
        try:
            shape, dtype = src.meta(key)
        except SourceError:
            raise SourceError(f"{src.ref}: no tensor {key} (needed by {path})") from None
        out[n] = Load(src.ref, key, shape, dtype)
    return out


def block_from_source(src: Source, cfg: ArchConfig, i: int, path: str) -> DecoderBlock:
    p = f"model.layers.{i}."
    llama_bias = cfg.family == "llama" and bool(src.config.get("attention_bias"))
    attn_names = ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]
    if cfg.qkv_bias:
        attn_names += ["q_proj.bias", "k_proj.bias", "v_proj.bias"]
    if llama_bias:
        attn_names.append("o_proj.bias")
    mlp_bias = bool(src.config.get("mlp_bias", False))
    ffn_names = ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    if mlp_bias:
        ffn_names += ["gate_proj.bias", "up_proj.bias", "down_proj.bias"]
    if src.family in MOE_FAMILIES:
        from compose.lower_moe import moe_from_source

        ffn = moe_from_source(src, cfg, i, path)
    else:
        ffn = make(DenseFFN, _loads(src, p + "mlp.", ffn_names, path), hidden=cfg.hidden,
                   intermediate=cfg.intermediate, act=cfg.act, bias=mlp_bias)
    return DecoderBlock(
        attn=make(Attention, _loads(src, p + "self_attn.", attn_names, path), hidden=cfg.hidden, heads=cfg.heads,
                  kv_heads=cfg.kv_heads, head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias, o_bias=llama_bias),
        ffn=ffn,
        input_norm=make(Norm, _loads(src, p + "input_layernorm.", ["weight"], path), dim=cfg.hidden,
                        eps=cfg.rms_eps),
        post_norm=make(Norm, _loads(src, p + "post_attention_layernorm.", ["weight"], path), dim=cfg.hidden,
                       eps=cfg.rms_eps),
        origin=Origin(src.ref, i),
    )


def lower_load(spec: LoadSpec, path: str) -> Graph:
    try:
        src = open_source(spec.ref)
    except SourceError as e:
        raise SourceError(f"{path}.ref: {e}") from None
    cfg = arch_config(src, spec.dtype)
    embed = make(Embedding, _loads(src, "model.embed_tokens.", ["weight"], path), vocab=cfg.vocab, hidden=cfg.hidden)
    head_w = embed.params()["weight"] if cfg.tie_embeddings else _loads(src, "lm_head.", ["weight"], path)["weight"]
    return Graph.decoder(
        cfg, embed,
        [block_from_source(src, cfg, i, path) for i in range(src.num_layers)],
        make(Norm, _loads(src, "model.norm.", ["weight"], path), dim=cfg.hidden, eps=cfg.rms_eps),
        make(LMHead, {"weight": head_w}, vocab=cfg.vocab, hidden=cfg.hidden, tied=cfg.tie_embeddings),
        meta={"train": "all"},
    )


# -- structural ops --------------------------------------------------------------------------------------

def lower_one(spec, path: str) -> Graph:
    """`spec` lowered, when it is one model: a composite (CALM, CogVLM) cannot go through the structural
    ops, merges or other compositions yet."""
    g = lower(spec, path)
    if any(op.vision is not None for _, op in g.blocks()):
        raise SpecError(f"{path}: a model with visual experts cannot be composed further yet; apply other "
                        "operations to the language model first")
    if g.side_configs:
        raise SpecError(f"{path}: a CALM model cannot be expanded, up-scaled, sliced, stacked, merged or "
                        "turned into experts yet; apply those to the anchor or augmenting model first")
    return g


def _rebuild(g: Graph, blocks: list[DecoderBlock], unused: list[DecoderBlock], meta: dict | None = None) -> Graph:
    return Graph.decoder(g.config, g.embedding, blocks, g.final_norm, g.head, unused, {**g.meta, **(meta or {})})


def _unused(g: Graph) -> list[DecoderBlock]:
    return [g.op(n) for n in g.dead() if isinstance(g.op(n), DecoderBlock)]


def identity_copy(block: DecoderBlock) -> DecoderBlock:
    """LLaMA-Pro's new block: a copy whose output projections are zero, so it adds exactly 0."""
    zero = {k: Zeros(e.shape, e.dtype) for k, e in block.params().items()
            if k.startswith(("self_attn.o_proj.", "mlp.down_proj."))}
    return dataclasses.replace(block.with_weights(**zero), origin=dataclasses.replace(block.origin, new=True))


def expand_blocks(g: Graph, spec: ExpandSpec, path: str) -> Graph:
    blocks = [op for _, op in g.blocks()]
    n = len(blocks)
    if spec.groups is not None:
        if n % spec.groups:
            raise SpecError(f"{path}.groups: {spec.groups} does not divide the model's {n} layers")
        size = n // spec.groups
        positions = [(k + 1) * size - 1 for k in range(spec.groups)]
    else:
        positions = sorted(set(spec.positions or []))
        bad = [p for p in positions if p >= n]
        if bad:
            raise SpecError(f"{path}.positions: {bad} out of range for a model of {n} layers (0..{n - 1})")
    out: list[DecoderBlock] = []
    after = set(positions)
    for i, b in enumerate(blocks):
        out.append(b)
        if i in after:
            out.extend(identity_copy(b) for _ in range(spec.per_group))
    return _rebuild(g, out, _unused(g), {"train": "new"})


def take_layers(g: Graph, start: int, stop: int, path: str) -> Graph:
    blocks = [op for _, op in g.blocks()]
    if stop > len(blocks):
        raise SpecError(f"{path}.stop: {stop} is past the model's {len(blocks)} layers")
    return _rebuild(g, blocks[start:stop], _unused(g) + blocks[:start] + blocks[stop:])


def depth_upscale(g: Graph, drop: int, path: str) -> Graph:
    n = len(g.blocks())
    if drop >= n:
        raise SpecError(f"{path}.drop: {drop} must be less than the model's {n} layers")
    return stack([take_layers(g, 0, n - drop, path), take_layers(g, drop, n, path)], path)


_MUST_MATCH = ("family", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "qkv_bias")


def stack(graphs: list[Graph], path: str) -> Graph:
    first = graphs[0]
    for i, g in enumerate(graphs[1:], 1):
        for f in _MUST_MATCH:
            a, b = getattr(first.config, f), getattr(g.config, f)
            if a != b:
                raise SpecError(f"{path}.slices[{i}]: {f} {b} does not match slices[0]'s {a} "
                                "(stacked slices need one family and width)")
    blocks = [op for g in graphs for _, op in g.blocks()]
    live = set(blocks)
    unused = list(dict.fromkeys(b for g in graphs for b in _unused(g) if b not in live))
    train = "new" if any(g.meta.get("train") == "new" for g in graphs) else "all"
    last = graphs[-1]
    head = first.head if first.config.tie_embeddings else last.head
    return Graph.decoder(first.config, first.embedding, blocks, last.final_norm, head, unused,
                         {**first.meta, "train": train})
