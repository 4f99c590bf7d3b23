"""Lowering of `calm` specs: two chains in one graph, joined by cross edges into CrossAttention nodes.

The anchor is the main chain (`embed -> layers.0 -> ... -> norm -> lm_head`) with a CrossAttention node
after each connected anchor layer; the augmenting model is the side chain `augment.embed ->
augment.layers.0 -> ...` (its final norm and head are not part of CALM), whose layer j feeds the
cross-attention it is paired with. Augmenting layers above the last connection feed nothing live, so
dead-weight elimination drops them and they are never read.
"""
from __future__ import annotations

import dataclasses
import math

from compose.errors import SpecError
from compose.families import tokenizer_files
from compose.ir.graph import CROSS, Graph
from compose.ir.nodes import CrossAttention, MoE
from compose.ir.state import CalmLayout
from compose.ir.weights import Load, Noise, Ones, Zeros, derive_seed
from compose.lower.common import hand_written, unused

PREFIX = "augment"


def default_pairs(n_anchor: int, n_augment: int, every: int) -> list[tuple[int, int]]:
    """lucidrains/CALM-pytorch's rule, 0-based: augmenting layers 0, every, 2*every, ..., each paired with
    an anchor layer, the anchor layers spread evenly (every n_anchor // connections-th from 0)."""
    connections = min(math.ceil(n_augment / every), n_anchor)
    anchor_every = n_anchor // connections
    return list(zip(range(0, n_anchor, anchor_every), range(0, n_augment, every)))


def lower(spec, path: str, ctx) -> Graph:
    a = ctx.input(spec.anchor, f"{path}.anchor")
    b = ctx.input(spec.augment, f"{path}.augment")
    hand_written(a, f"{path}.anchor", "CALM")
    hand_written(b, f"{path}.augment", "CALM")
    _same_vocabulary(a, b, path, ctx)
    blocks_a, blocks_b = a.blocks(), b.blocks()
    if any(isinstance(op.ffn, MoE) for _, op in blocks_a + blocks_b):
        raise SpecError(f"{path}: CALM of mixture-of-experts models is not supported yet")
    pairs = _pairs(spec, len(blocks_a), len(blocks_b), path)
    heads = spec.heads or a.config.heads
    if a.config.hidden % heads:
        raise SpecError(f"{path}.heads: {heads} heads do not divide the anchor's width {a.config.hidden}")

    dtype = a.config.dtype
    after = {}
    for k, (i, _) in enumerate(pairs):
        after[i] = (f"xattn.{k}", _cross_attention(spec, a, b, heads, k, dtype))

    main = ["embed"]
    nodes = [("embed", a.embedding)]
    for i, (_, blk) in enumerate(blocks_a):
        nodes.append((f"layers.{i}", blk))
        main.append(f"layers.{i}")
        if i in after:
            nodes.append(after[i])
            main.append(after[i][0])
    nodes += [("norm", a.final_norm), ("lm_head", a.head)]
    main += ["norm", "lm_head"]
    side = [f"{PREFIX}.embed"] + [f"{PREFIX}.layers.{j}" for j in range(len(blocks_b))]
    nodes += [(side[0], b.embedding)] + [(n, blk) for n, (_, blk) in zip(side[1:], blocks_b)]
    nodes += [(f"unused.{u}", op) for u, op in enumerate(unused(a))]
    edges = list(zip(main, main[1:])) + list(zip(side, side[1:]))
    edges += [(f"{PREFIX}.layers.{j}", f"xattn.{k}", CROSS) for k, (_, j) in enumerate(pairs)]
    state = a.state.but(train="cross", calm=CalmLayout(tuple(pairs), _ref(b)))
    side_cfg = dataclasses.replace(b.config, dtype=dtype)
    return Graph(a.config, nodes, edges, state, {PREFIX: side_cfg})


def _pairs(spec, n_a: int, n_b: int, path: str) -> list[tuple[int, int]]:
    if spec.pairs is None:
        return default_pairs(n_a, n_b, spec.every)
    pairs = [tuple(p) for p in spec.pairs]
    for k, (i, j) in enumerate(pairs):
        if i >= n_a:
            raise SpecError(f"{path}.pairs[{k}]: anchor layer {i} is out of range (the anchor has {n_a} layers)")
        if j >= n_b:
            raise SpecError(f"{path}.pairs[{k}]: augmenting layer {j} is out of range "
                            f"(the augmenting model has {n_b} layers)")
    anchors = [i for i, _ in pairs]
    if len(set(anchors)) != len(anchors):
        raise SpecError(f"{path}.pairs: each anchor layer takes at most one cross-attention, got {anchors}")
    if not pairs:
        raise SpecError(f"{path}.pairs: give at least one (anchor_layer, augment_layer) pair")
    return sorted(pairs)


def _cross_attention(spec, a: Graph, b: Graph, heads: int, k: int, dtype: str) -> CrossAttention:
    h, hb, hd = a.config.hidden, b.config.hidden, a.config.hidden // heads
    inner = heads * hd

    def rand(name, shape):
        return Noise(Zeros(shape, dtype), spec.std, derive_seed(spec.seed, "calm", k, name))

    weights = {"norm.weight": Ones((h,), dtype), "context_proj.weight": rand("context_proj", (h, hb)),
               "q_proj.weight": rand("q_proj", (inner, h)), "k_proj.weight": rand("k_proj", (inner, h)),
               "v_proj.weight": rand("v_proj", (inner, h)),
               # Zero output projection: the layer adds exactly 0 until it trains.
               "o_proj.weight": Zeros((h, inner), dtype)}
    return CrossAttention(weights=tuple(weights.items()), hidden=h, context_hidden=hb, heads=heads, head_dim=hd,
                          eps=a.config.rms_eps, context=PREFIX)


def _ref(g: Graph) -> str:
    w = g.embedding.params()["weight"]
    return w.source if isinstance(w, Load) else "composed"


def _same_vocabulary(a: Graph, b: Graph, path: str, ctx) -> None:
    """CALM feeds one token sequence to both models: they need one vocabulary."""
    if a.config.vocab != b.config.vocab:
        raise SpecError(f"{path}.augment: a vocabulary of {b.config.vocab} tokens, the anchor's has "
                        f"{a.config.vocab}; CALM reads one token sequence with both models (same tokenizer needed)")
    va, vb = _tokenizer_vocab(a, ctx), _tokenizer_vocab(b, ctx)
    if va is not None and vb is not None and va != vb:
        raise SpecError(f"{path}.augment: its tokenizer's vocabulary differs from the anchor's; CALM reads one "
                        "token sequence with both models (same tokenizer needed)")


def _tokenizer_vocab(g: Graph, ctx) -> dict | None:
    """The vocabulary of the tokenizer a graph ships, when it is a source's tokenizer.json."""
    t = g.state.tokenizer
    folder = ctx.open(t).folder if isinstance(t, str) else None
    f = folder / "tokenizer.json" if folder else None
    if f is None or not f.is_file():
        return None
    tokenizer_files.check(folder)
    data = tokenizer_files.read_json(f, "tokenizer.json")
    return {"vocab": data.get("model", {}).get("vocab"), "added": [t.get("content") for t in data.get("added_tokens", [])]}
