"""Mixtral: Mistral attention and norms, every layer a top-k MoE (softmax over all experts, the top k
renormalised), no shared expert, no biases, one sliding window for every layer.

On disk the experts are `block_sparse_moe.experts.E.w1/w3/w2` (gate, up, down): what transformers saves by
default and what llama.cpp's converter reads, so compose writes them; transformers 5 and mergekit 0.1.5
may also hold them stacked under `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`, which compose reads.
"""
from __future__ import annotations

from compose.families.base import (Family, int_field, model_window, moe_blocks, number_field,
                                   refuse_unless_one_window)
from compose.families.experts import read_experts, read_router, refuse_mixed_layers
from compose.ir.graph import Graph
from compose.ir.nodes import DecoderBlock, MoE
from compose.ir.weights import Expr

EXPERT_NAMES = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
"""IR projection -> Mixtral's checkpoint name."""
PREFIX = "block_sparse_moe"


class Mixtral(Family):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    dense = "mistral"
    gguf_arch = "llama"  # llama.cpp's llama with stacked experts (ffn_gate_exps, ...)
    default_theta = 1e6
    default_max_positions = 4096 * 32
    keys = ("sliding_window", "num_local_experts", "num_experts_per_tok", "router_jitter_noise",
            "router_aux_loss_coef", "output_router_logits")
    expert_prefix = PREFIX
    expert_names = EXPERT_NAMES

    def window(self, c, i, where):
        return model_window(c, where)

    def ffn(self, c, cfg, i, reader, prefix, where):
        base = f"model.layers.{i}."
        # Stacked or per-expert under `mlp.` (transformers 5, mergekit), else the legacy block_sparse_moe.
        p = base + ("mlp." if reader.has(base + "mlp.gate.weight") else f"{PREFIX}.")
        n = int_field(c, "num_local_experts", where)
        top_k = int_field(c, "num_experts_per_tok", where)
        router = read_router(reader, p, cfg, n, top_k, norm_topk_prob=True)
        return MoE(router=router, experts=read_experts(reader, p, n, cfg, cfg.intermediate, EXPERT_NAMES),
                   jitter=number_field(c, "router_jitter_noise", 0.0, where),
                   aux_loss_coef=number_field(c, "router_aux_loss_coef", 0.001, where))

    def refuse(self, g: Graph) -> str | None:
        moes, blocks = moe_blocks(g), g.blocks()
        if len(moes) != len(blocks):
            return "every Mixtral layer is a mixture of experts, and this model has dense layers"
        m = moes[0][1]
        if m.shared is not None:
            return "Mixtral has no shared experts"
        if not m.router.norm_topk_prob:
            return "Mixtral always renormalises the top-k routing weights (norm_topk_prob)"
        if any(b.attn.qkv_bias or b.attn.o_bias for _, b in blocks):
            return "Mixtral attention has no biases"
        return refuse_mixed_layers(g) or refuse_unless_one_window(g, self.architecture)

    def block_names(self, prefix: str, b: DecoderBlock) -> dict[str, Expr]:
        out = {}
        for k, e in b.params().items():
            if k.startswith("mlp.experts."):
                _, _, e_idx, proj, leaf = k.split(".")
                k = f"{PREFIX}.experts.{e_idx}.{EXPERT_NAMES[proj]}.{leaf}"
            elif k.startswith("mlp."):
                k = f"{PREFIX}.{k[len('mlp.'):]}"
            out[prefix + k] = e
        return out

    def own_config(self, g: Graph) -> dict:
        m = moe_blocks(g)[0][1]
        return {"num_local_experts": m.router.experts, "num_experts_per_tok": m.router.top_k,
                "intermediate_size": m.intermediate, "router_aux_loss_coef": m.aux_loss_coef,
                "router_jitter_noise": m.jitter, "output_router_logits": False,
                "sliding_window": g.blocks()[0][1].attn.window}


FAMILY = Mixtral()
