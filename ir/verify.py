"""The verifier: every node's weights have the shapes its op expects, and the chain is a decoder.

It reads only shapes and structure, never tensor data, so it is cheap enough to run after every pass.
"""
from __future__ import annotations

from compose.errors import IRError
from compose.ir.graph import Graph
from compose.ir.nodes import DecoderBlock, DenseFFN, Embedding, LMHead, Norm


def verify(g: Graph) -> None:
    cfg = g.config
    chain = g.chain()
    kinds = [type(g.op(n)) for n in chain]
    if kinds[0] is not Embedding or kinds[-1] is not LMHead or kinds[-2] is not Norm:
        raise IRError(f"the chain must run Embedding -> blocks -> Norm -> LMHead, found "
                      f"{' -> '.join(k.__name__ for k in kinds)}")
    if any(k is not DecoderBlock for k in kinds[1:-2]):
        raise IRError("only DecoderBlocks may stand between the Embedding and the final Norm")
    for name, op in g.items():
        op.verify_(name)
        if isinstance(op, DecoderBlock):
            a, f = op.attn, op.ffn
            # A dense FFN has the model's width; MoE experts have their own (fine-grained experts are narrower).
            inter = f.intermediate if isinstance(f, DenseFFN) else cfg.intermediate
            got = (a.hidden, a.heads, a.kv_heads, a.head_dim, inter)
            want = (cfg.hidden, cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate)
            if got != want:
                raise IRError(f"node {name}: (hidden, heads, kv_heads, head_dim, intermediate) = {got}, "
                              f"but the model's config says {want}")
    emb, head = g.embedding, g.head
    if (emb.vocab, emb.hidden) != (cfg.vocab, cfg.hidden) or (head.vocab, head.hidden) != (cfg.vocab, cfg.hidden):
        raise IRError(f"node embed/lm_head: vocab x hidden must be {cfg.vocab} x {cfg.hidden}")
    if head.tied != cfg.tie_embeddings:
        raise IRError("node lm_head: tied flag disagrees with the model config")
    if head.tied and head.params()["weight"] != emb.params()["weight"]:
        raise IRError("node lm_head: tied to the embedding but its weight is a different expression")
