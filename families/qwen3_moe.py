"""Qwen3-MoE: Qwen3 attention (per-head q/k norms, its own head_dim, q/k/v/o biases behind
`attention_bias`) and one model-wide sliding window behind `use_sliding_window`; MoE layers everywhere
but `mlp_only_layers` (every `decoder_sparse_step`-th), softmax then top-k, renormalised only with
`norm_topk_prob`, the weights cast to the model's dtype; no shared expert.

It is the MoE class of a Qwen3: `moe.upcycle`, `moe.from_experts` and `moe.fine_grained` without shared
experts write it. Shared experts it cannot hold exactly (it has no shared expert at all), so a Qwen3
DeepSeekMoE with `shared` > 0 is refused by name rather than written approximately.
"""
from __future__ import annotations

from compose.families.base import Family, Features, int_field, moe_blocks, number_field, refuse_unless_one_window
from compose.families.experts import dense_layer, read_experts, read_router, refuse_mixed_layers
from compose.families.llama import flag
from compose.families.qwen2_moe import mlp_only_layers
from compose.families.qwen3 import Qwen3
from compose.ir.graph import Graph
from compose.ir.nodes import MoE


class Qwen3Moe(Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    dense = "qwen3"
    gguf_arch = "qwen3moe"
    qk_norm = True
    features = Features(moe_weights_in_model_dtype=True)
    expert_prefix = "mlp"
    default_max_positions = 32768
    tiny_options = {"tie": 0, "experts": 4}
    keys = ("attention_bias", "use_sliding_window", "sliding_window", "decoder_sparse_step", "moe_intermediate_size",
            "num_experts_per_tok", "num_experts", "num_local_experts", "norm_topk_prob", "mlp_only_layers", "router_aux_loss_coef",
            "output_router_logits")

    biases = Qwen3.biases  # Qwen3's attention
    biases_of = Qwen3.biases_of

    def window(self, c, i, where):
        return int_field(c, "sliding_window", where) if flag(c, "use_sliding_window", where) else None

    def ffn(self, c, cfg, i, reader, prefix, where):
        step = int_field(c, "decoder_sparse_step", where, default=1)
        # transformers 5 saves the count as num_local_experts (num_experts is its alias); the Hub's files,
        # and transformers 4, use num_experts.
        n = int_field(c, "num_experts" if "num_experts" in c else "num_local_experts", where, minimum=0)
        if i in mlp_only_layers(c, where) or n == 0 or (i + 1) % step:
            return dense_layer(reader, prefix, cfg, cfg.intermediate)
        width = int_field(c, "moe_intermediate_size", where)
        router = read_router(reader, prefix, cfg, n, int_field(c, "num_experts_per_tok", where),
                             norm_topk_prob=flag(c, "norm_topk_prob", where))
        return MoE(router=router, experts=read_experts(reader, prefix, n, cfg, width, self.expert_names),
                   aux_loss_coef=number_field(c, "router_aux_loss_coef", 0.001, where))

    def refuse(self, g: Graph) -> str | None:
        moes = moe_blocks(g)
        if not moes:
            return "it has no mixture-of-experts layers (a dense Qwen3 is a Qwen3ForCausalLM)"
        for i, m in moes:
            if m.shared is not None:
                return (f"layer {i} has shared experts, and {self.architecture} has none (a DeepSeekMoE of a "
                        "Qwen3 needs shared: 0)")
            if m.jitter:
                return f"layer {i} has router jitter {m.jitter}, which {self.architecture} does not have"
        return refuse_mixed_layers(g) or self.refuse_attention(g)

    def refuse_windows(self, g: Graph) -> str | None:
        return refuse_unless_one_window(g, self.architecture)

    def own_config(self, g: Graph) -> dict:
        moes = moe_blocks(g)
        m = moes[0][1]
        moe_layers = {i for i, _ in moes}
        window = g.blocks()[0][1].attn.window
        return {"num_experts": m.router.experts, "num_experts_per_tok": m.router.top_k,
                "moe_intermediate_size": m.intermediate, "norm_topk_prob": m.router.norm_topk_prob,
                "decoder_sparse_step": 1, "mlp_only_layers": [i for i in range(len(g.blocks())) if i not in moe_layers],
                "router_aux_loss_coef": m.aux_loss_coef, "output_router_logits": False,
                "attention_bias": g.config.qkv_bias, "use_sliding_window": window is not None,
                "sliding_window": window}

    def tiny_config(self, o):
        return {**super().tiny_config(o), "head_dim": 2 * o["hidden"] // o["heads"], "attention_bias": False,
                "use_sliding_window": False, "sliding_window": None, "num_experts": o["experts"],
                "num_experts_per_tok": 2, "moe_intermediate_size": o["intermediate"] // 2, "norm_topk_prob": True,
                "decoder_sparse_step": 1, "mlp_only_layers": []}


FAMILY = Qwen3Moe()
