"""The verifier: every node's weights have the shapes its op expects, and the chains are decoders.

It reads only shapes and structure, never tensor data, so it is cheap enough to run after every pass.
"""
from __future__ import annotations

from compose.errors import IRError
from compose.ir.config import ArchConfig
from compose.ir.graph import CROSS, Graph
from compose.ir.nodes import CrossAttention, DecoderBlock, DenseFFN, Embedding, Layer, LMHead, Norm, Tensors


def verify(g: Graph) -> None:
    cfg = g.config
    chain = g.chain()
    kinds = [type(g.op(n)) for n in chain]
    if g.derived:
        return _verify_derived(g, kinds)
    if kinds[0] is not Embedding or kinds[-1] is not LMHead or kinds[-2] is not Norm:
        raise IRError(f"the chain must run Embedding -> blocks -> Norm -> LMHead, found "
                      f"{' -> '.join(k.__name__ for k in kinds)}")
    if any(k not in (DecoderBlock, CrossAttention) for k in kinds[1:-2]):
        raise IRError("only DecoderBlocks and CrossAttentions may stand between the Embedding and the final Norm")
    config_of = {n: cfg for n in g.names()}
    for prefix, side in g.side_chains().items():
        config_of.update({n: g.side_configs[prefix] for n in side})
        if type(g.op(side[0])) is not Embedding or any(type(g.op(n)) is not DecoderBlock for n in side[1:]):
            raise IRError(f"side chain {prefix} must run Embedding -> DecoderBlocks")
    for name, op in g.items():
        op.verify_(name)
        if isinstance(op, DecoderBlock):
            _check_block(name, op, config_of[name])
        if isinstance(op, CrossAttention):
            _check_cross(g, name, op)
    emb, head = g.embedding, g.head
    if (emb.vocab, emb.hidden) != (cfg.vocab, cfg.hidden) or (head.vocab, head.hidden) != (cfg.vocab, cfg.hidden):
        raise IRError(f"node embed/lm_head: vocab x hidden must be {cfg.vocab} x {cfg.hidden}")
    if head.tied != cfg.tie_embeddings:
        raise IRError("node lm_head: tied flag disagrees with the model config")
    if head.tied and head.params()["weight"] != emb.params()["weight"]:
        raise IRError("node lm_head: tied to the embedding but its weight is a different expression")
    _check_calm_layout(g)


def _verify_derived(g: Graph, kinds: list[type]) -> None:
    """A derived family's chain: its stem Tensors, Layers, its tail Tensors; every weight of its shape."""
    if kinds[-1] is not Tensors or g.tail.part != "tail" or any(k is not Layer for k in kinds[1:-1]):
        raise IRError(f"a derived model's chain must run Tensors(stem) -> Layers -> Tensors(tail), found "
                      f"{' -> '.join(k.__name__ for k in kinds)}")
    if g.side_configs:
        raise IRError("a derived model has no side chains")
    for name, op in g.items():
        op.verify_(name)


def _check_block(name: str, op: DecoderBlock, cfg: ArchConfig) -> None:
    a, f = op.attn, op.ffn
    # A dense FFN has the model's width; MoE experts have their own (fine-grained experts are narrower).
    inter = f.intermediate if isinstance(f, DenseFFN) else cfg.intermediate
    got = (a.hidden, a.heads, a.kv_heads, a.head_dim, inter)
    want = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate)
    if got != want:
        raise IRError(f"node {name}: (hidden, heads, kv_heads, head_dim, intermediate) = {got}, "
                      f"but the model's config says {want}")


def _check_cross(g: Graph, name: str, op: CrossAttention) -> None:
    feeds = [a for a, b, kind in g.edges() if b == name and kind == CROSS]
    if len(feeds) != 1:
        raise IRError(f"node {name}: a cross-attention reads exactly one side-chain block, found {feeds}")
    side = g.side_configs.get(op.context)
    if side is None or not feeds[0].startswith(op.context + "."):
        raise IRError(f"node {name}: reads {feeds[0]}, not a block of side chain {op.context!r}")
    if (op.hidden, op.context_hidden) != (g.config.hidden, side.hidden):
        raise IRError(f"node {name}: widths {op.hidden} <- {op.context_hidden} do not match the anchor's "
                      f"{g.config.hidden} and {op.context}'s {side.hidden}")


def _check_calm_layout(g: Graph) -> None:
    """The CalmLayout's pairs are what the structure says: the k-th cross-attention follows anchor layer i
    on the main chain and reads augmenting layer j through its cross edge."""
    cross = [n for n in g.chain() if isinstance(g.op(n), CrossAttention)]
    layout = g.state.calm
    if layout is None:
        if cross:
            raise IRError(f"node {cross[0]}: a cross-attention in a graph without a CALM layout")
        return
    if len(cross) != len(layout.pairs):
        raise IRError(f"the CALM layout has {len(layout.pairs)} pairs for {len(cross)} cross-attention nodes")
    chain = g.chain()
    anchor_index = {n: i for i, (n, _) in enumerate(g.blocks())}
    for name, (i, j) in zip(cross, layout.pairs):
        before = chain[chain.index(name) - 1]
        source = next(a for a, b, kind in g.edges() if b == name and kind == CROSS)
        side_index = {n: k for k, (n, _) in enumerate(g.side_blocks(g.op(name).context))}
        if anchor_index.get(before) != i or side_index.get(source) != j:
            raise IRError(f"node {name}: joins anchor layer {anchor_index.get(before)} and augmenting layer "
                          f"{side_index.get(source)}, but the CALM layout says ({i}, {j})")
