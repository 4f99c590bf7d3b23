"""Helpers the structural lowerings share: rebuilding a decoder chain around new blocks."""
from __future__ import annotations

from compose.ir.graph import Graph
from compose.errors import SpecError
from compose.ir.nodes import Block, DecoderBlock, Layer


def unused(g: Graph) -> list[Block]:
    """The blocks of `g` off its chain (layers a slice did not take): kept so a dump shows them."""
    return [g.op(n) for n in g.dead() if isinstance(g.op(n), (DecoderBlock, Layer))]


def rebuild(g: Graph, blocks: list[Block], dropped: list[Block], **state) -> Graph:
    """`g`'s embedding, final norm and head (a derived model's stem and tail) around `blocks`; `dropped` blocks
    stay off the chain, and `state` records change."""
    if g.derived:
        return Graph.layered(g.config, g.embedding, blocks, g.tail, dropped, g.state.but(**state))
    return Graph.decoder(g.config, g.embedding, blocks, g.final_norm, g.head, dropped, g.state.but(**state))


def hand_written(g: Graph, path: str, what: str) -> None:
    """A SpecError when `g` is a derived family's model (compose.families.derived), whose layers compose does
    not compute with: `what` (an MoE, CALM, a visual expert) needs the family's hand-written module."""
    if g.derived:
        raise SpecError(f"{path}: {what} needs a hand-written family module, and {g.config.family} is derived from "
                        f"transformers' class (it has merges, layers, stack, depth_upscale and expand_blocks)")
