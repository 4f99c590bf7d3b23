"""Helpers the structural lowerings share: rebuilding a decoder chain around new blocks."""
from __future__ import annotations

from compose.ir.graph import Graph
from compose.ir.nodes import DecoderBlock


def unused(g: Graph) -> list[DecoderBlock]:
    """The blocks of `g` off its chain (layers a slice did not take): kept so a dump shows them."""
    return [g.op(n) for n in g.dead() if isinstance(g.op(n), DecoderBlock)]


def rebuild(g: Graph, blocks: list[DecoderBlock], dropped: list[DecoderBlock], **state) -> Graph:
    """`g`'s embedding, final norm and head around `blocks`; `dropped` blocks stay off the chain, and
    `state` records change."""
    return Graph.decoder(g.config, g.embedding, blocks, g.final_norm, g.head, dropped, g.state.but(**state))
