"""Qwen2-MoE: Qwen2 attention (q/k/v biases behind `qkv_bias`) and per-layer sliding or full attention;
MoE layers everywhere but `mlp_only_layers` (every `decoder_sparse_step`-th), top-k routing renormalised
only with `norm_topk_prob`, and a shared expert gated by sigmoid(shared_expert_gate(x)) in every MoE layer.

It is the class for MoE graphs Mixtral cannot hold (dense layers in between, shared experts, q/k/v biases).
Two rewrites make such graphs exact in it, done by the target pass so that a dump shows them:
- an MoE without shared experts gets a zero-width one behind a zero gate: it adds exactly 0;
- an always-on shared expert (DeepSeekMoE's) goes behind a zero gate with its down projection doubled:
  sigmoid(0) = 1/2 and the doubling and halving are exact in floating point, so it adds exactly its output.
"""
from __future__ import annotations

import dataclasses

from compose.errors import SourceError
from compose.families.base import (Family, Features, int_field, layer_types_config, moe_blocks, number_field,
                                   one_window_size, qwen2_window)
from compose.families.experts import dense_layer, moe_config, read_experts, read_router, refuse_mixed_layers
from compose.ir.graph import Graph
from compose.ir.nodes import DenseFFN, MoE
from compose.ir.weights import Scale, Zeros


class Qwen2Moe(Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    dense = "qwen2"
    gguf_arch = "qwen2moe"
    features = Features(moe_shared_gate=True, moe_weights_in_model_dtype=True)
    expert_prefix = "mlp"
    default_max_positions = 32768
    keys = ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "decoder_sparse_step",
            "moe_intermediate_size", "shared_expert_intermediate_size", "num_experts_per_tok", "num_experts",
            "norm_topk_prob", "mlp_only_layers", "qkv_bias", "router_aux_loss_coef", "router_jitter_noise",
            "output_router_logits")

    def biases(self, c, where):
        qkv = c.get("qkv_bias", True)
        if not isinstance(qkv, bool):
            raise SourceError(f"{where}: config.json qkv_bias must be true or false, got {qkv!r}")
        return qkv, False, False

    def window(self, c, i, where):
        if c.get("layer_types") is not None or not c.get("use_sliding_window"):
            return qwen2_window(c, i, where)
        # Qwen2-MoE's own default: every other layer below max_window_layers.
        below = i < int_field(c, "max_window_layers", where, default=28, minimum=0)
        return int_field(c, "sliding_window", where) if (i + 1) % 2 and below else None

    def ffn(self, c, cfg, i, reader, prefix, where):
        only = mlp_only_layers(c, where)
        step = int_field(c, "decoder_sparse_step", where, default=1)
        n = int_field(c, "num_experts", where, minimum=0)
        if i in only or n == 0 or (i + 1) % step:
            return dense_layer(reader, prefix, cfg, cfg.intermediate)
        width = int_field(c, "moe_intermediate_size", where)
        router = read_router(reader, prefix, cfg, n, int_field(c, "num_experts_per_tok", where),
                             norm_topk_prob=bool(c.get("norm_topk_prob", False)))
        shared = gate = None
        shared_width = int_field(c, "shared_expert_intermediate_size", where, default=0, minimum=0)
        if shared_width:
            shared = dense_layer(reader, prefix + "shared_expert.", cfg, shared_width)
            gate = reader.load(prefix + "shared_expert_gate.weight", (1, cfg.hidden))
        return MoE(router=router, experts=read_experts(reader, prefix, n, cfg, width, self.expert_names), shared=shared,
                   shared_gate=gate, jitter=number_field(c, "router_jitter_noise", 0.0, where),
                   aux_loss_coef=number_field(c, "router_aux_loss_coef", 0.001, where))

    def refuse(self, g: Graph) -> str | None:
        if not moe_blocks(g):
            return "it has no mixture-of-experts layers (a dense Qwen2 is a Qwen2ForCausalLM)"
        for name, b in g.blocks():
            if b.attn.o_bias:
                return f"node {name}: an o_proj bias, which Qwen2-MoE attention does not have"
            if isinstance(b.ffn, DenseFFN) and b.ffn.bias:
                return f"node {name}: MLP biases, which Qwen2-MoE's dense layers do not have"
        if len({b.attn.qkv_bias for _, b in g.blocks()}) > 1:
            return "some layers have q/k/v biases and some do not"
        return refuse_mixed_layers(g) or one_window_size(g, self.architecture)

    def prepare(self, g: Graph) -> Graph:
        ops = {}
        for name, b in g.blocks():
            m = b.ffn
            if not isinstance(m, MoE) or m.shared_gate is not None:
                continue
            h, dtype = m.hidden, m.router.params()["weight"].dtype
            if m.shared is None:
                zero = {"gate_proj.weight": Zeros((0, h), dtype), "up_proj.weight": Zeros((0, h), dtype),
                        "down_proj.weight": Zeros((h, 0), dtype)}
                shared = DenseFFN(weights=tuple(zero.items()), hidden=h, intermediate=0, act=m.act)
            else:
                shared = m.shared.with_weights(**{k: Scale(w, 2.0) for k, w in m.shared.params().items()
                                                  if k.startswith("down_proj.")})
            gated = dataclasses.replace(m, shared=shared, shared_gate=Zeros((1, h), dtype))
            ops[name] = dataclasses.replace(b, ffn=gated)
        return g.replace(ops) if ops else g

    def own_config(self, g: Graph) -> dict:
        m = moe_blocks(g)[0][1]
        return {**moe_config(g), "decoder_sparse_step": 1, "qkv_bias": g.config.qkv_bias,
                "router_jitter_noise": m.jitter, "output_router_logits": False, **layer_types_config(g)}


def mlp_only_layers(c: dict, where: str) -> list[int]:
    """The layers kept dense (`mlp_only_layers`; null: none)."""
    only = c.get("mlp_only_layers") or []
    if not isinstance(only, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in only):
        raise SourceError(f"{where}: config.json mlp_only_layers must be a list of layer indices, got {only!r}")
    return only


FAMILY = Qwen2Moe()
