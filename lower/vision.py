"""Lowering of `visual_expert` specs (CogVLM): every block gets a VisionExpert whose weights are the
language weights (the same expressions, so nothing is computed twice), and a vision adapter node feeds
the embedding through a cross edge (image features take the patches' places in the sequence)."""
from __future__ import annotations

import dataclasses

from compose.errors import SpecError
from compose.ir.graph import CROSS, Graph
from compose.ir.nodes import Adapter, DenseFFN, VisionExpert
from compose.ir.weights import Noise, Zeros, derive_seed
from compose.lower.common import hand_written

ADAPTER = "vision_adapter"


def lower(spec, path: str, ctx) -> Graph:
    g = ctx.input(spec.model, f"{path}.model")
    hand_written(g, f"{path}.model", "a visual expert (CogVLM)")
    ops = {}
    for name, b in g.blocks():
        if not isinstance(b.ffn, DenseFFN):
            raise SpecError(f"{path}.model: visual experts for mixture-of-experts layers are not supported yet")
        ops[name] = dataclasses.replace(b, vision=VisionExpert(attn=b.attn, ffn=b.ffn))
    h, dtype = g.config.hidden, g.config.dtype

    def rand(name, shape):
        return Noise(Zeros(shape, dtype), spec.std, derive_seed(spec.seed, "adapter", name))

    adapter = Adapter(weights=(("fc1.weight", rand("fc1", (h, spec.vision_width))), ("fc1.bias", Zeros((h,), dtype)),
                               ("fc2.weight", rand("fc2", (h, h))), ("fc2.bias", Zeros((h,), dtype))),
                      vision_width=spec.vision_width, hidden=h)
    nodes = [(n, ops.get(n, op)) for n, op in g.items()] + [(ADAPTER, adapter)]
    edges = g.edges() + [(ADAPTER, g.chain()[0], CROSS)]
    return Graph(g.config, nodes, edges, g.state.but(train="vision"), g.side_configs)
