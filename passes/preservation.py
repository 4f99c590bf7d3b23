from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compose.ir import CrossAttention, DecoderBlock, Graph, Layer
from compose.ir.weights import is_zero
from compose.passes.base import Pass


def adds_zero(block: DecoderBlock | Layer) -> bool:
    """A pre-norm block adds attn(..) @ o_proj + ffn(..) @ down_proj to the residual: when both output
    projections (and their biases) are zero by construction, it adds exactly 0, bit for bit. A derived family's
    layer names its residual-output projections itself (checked on its class when expand_blocks zeroes them)."""
    p, outs = block.params(), block.residual_outputs()
    # An MoE adds sum_e p_e * down_e(..) (+ the shared FFN's down): zero when every down projection is.
    return bool(outs) and all(is_zero(p[k]) for k in outs)


@dataclass(frozen=True)
class Preservation(Pass):
    """Function-preservation analysis: mark blocks (and CALM's cross-attentions) that are exact identities at
    init, on the nodes themselves (`identity`); the dump lists them as `state identity blocks`."""

    name = "preservation"

    def run(self, g: Graph) -> Graph:
        ops = {n: dataclasses.replace(b, identity=adds_zero(b)) for n, b in g.blocks()}
        # CALM's cross-attention adds o_proj(...): exactly 0 while o_proj is zero.
        ops.update({n: dataclasses.replace(op, identity=is_zero(op.params()["o_proj.weight"]))
                    for n, op in g.items() if isinstance(op, CrossAttention)})
        return g.replace(ops)
