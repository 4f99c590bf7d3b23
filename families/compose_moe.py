"""Mixtures of experts no transformers class holds (a Gemma 2/3 or Phi-3 upcycle, a Qwen3 DeepSeekMoE with
shared experts): written as the generated modeling code with a config.json whose `auto_map` names it, so
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)` loads it offline.

The dense family's own config.json fields are written as that family writes them (so the file says
everything the model is), with the MoE fields Qwen2-MoE names (`num_experts`, `num_experts_per_tok`,
`moe_intermediate_size`, `shared_expert_intermediate_size`, `mlp_only_layers`, `norm_topk_prob`). Dense
layers keep the dense family's tensor names; an MoE layer holds `mlp.gate.weight`, its experts stacked as
transformers 5 holds them in memory (`mlp.experts.gate_up_proj` (E, 2 * width, hidden), gate's rows then
up's; `mlp.experts.down_proj` (E, hidden, width)), and the always-on shared experts as one FFN
(`mlp.shared_expert.*`, DeepSeekMoE's: no gate). Stacked on disk, the names are the generated module's
parameter names, so transformers loads them with no conversion.
"""
from __future__ import annotations

import functools

from compose.errors import SourceError
from compose.families.base import Family, fill, int_field, moe_blocks, number_field
from compose.families.composite import AUTO_MAP
from compose.families.experts import moe_config, read_experts, read_router, refuse_mixed_layers
from compose.families.llama import flag
from compose.families.qwen2_moe import mlp_only_layers
from compose.ir.graph import Graph
from compose.ir.nodes import DecoderBlock, DenseFFN, MoE
from compose.ir.weights import Concat, Expr, Stack

MOE_KEYS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
            "shared_expert_intermediate_size", "mlp_only_layers", "router_aux_loss_coef", "compose")
"""The config.json fields this family adds to the dense family's."""


class ComposeMoe(Family):
    model_type = "compose_moe"
    architecture = "ComposeHFForCausalLM"
    dense = "compose_moe"
    generated = True
    expert_prefix = "mlp"  # stacked on disk already: the names need no conversion when loaded

    def source_family(self, c: dict, where: str) -> Family:
        """The family that reads an output of this one back (MoE, then merge or expand): the dense
        family's attention, norms and names, with this family's MoE layers."""
        about = c.get("compose")
        dense = about.get("family") if isinstance(about, dict) and about.get("kind") == "moe" else None
        from compose import families

        if dense not in families.SOURCES or families.get(dense).dense != dense or families.get(dense).generated:
            raise SourceError(f"{where}: config.json compose.family must name the dense family of a compose MoE "
                              f"build, got {dense!r}")
        return _reader(type(families.get(dense)))

    def refuse(self, g: Graph) -> str | None:
        moes = moe_blocks(g)
        if g.composite or not moes:
            return "only mixture-of-experts models without a transformers class are written this way"
        for i, m in moes:
            if m.shared_gate is not None:
                return f"layer {i} has a gated shared expert, which the generated module does not have"
            if m.jitter:
                return f"layer {i} has router jitter {m.jitter}, which the generated module does not implement"
            if m.bias:
                return f"layer {i}'s experts have biases, which the generated module's experts do not have"
        return refuse_mixed_layers(g)

    def block_names(self, prefix: str, b: DecoderBlock) -> dict[str, Expr]:
        """The IR's names (every dense family writes them as they are), one MoE layer's experts stacked
        where the per-expert tensors would be."""
        if not isinstance(b.ffn, MoE):
            return super().block_names(prefix, b)
        experts = b.ffn.experts
        out: dict[str, Expr] = {}
        for k, e in b.params().items():
            if ".experts." not in k:
                out[prefix + k] = e
            elif prefix + "mlp.experts.down_proj" not in out:
                out[prefix + "mlp.experts.gate_up_proj"] = Stack(tuple(_gate_up(x.params()) for x in experts))
                out[prefix + "mlp.experts.down_proj"] = Stack(tuple(x.params()["down_proj.weight"] for x in experts))
        return out

    def config_json(self, g: Graph) -> dict:
        from compose import families

        return {**families.get(g.config.family).config_json(g), **moe_config(g), "model_type": self.model_type,
                "architectures": [self.architecture], "auto_map": AUTO_MAP,
                "compose": {"kind": "moe", "family": g.config.family}}


@functools.cache
def _reader(dense: type[Family]) -> Family:
    """`dense`'s family reading a compose_moe checkpoint: its config with the MoE fields taken out, its
    blocks with the MoE layers this family writes."""

    class Reading(dense):
        def arch_config(self, c, where, dtype):
            return super().arch_config({k: v for k, v in c.items() if k not in MOE_KEYS}, where, dtype)

        def ffn(self, c, cfg, i, reader, prefix, where):
            if i in mlp_only_layers(c, where):
                return super().ffn(c, cfg, i, reader, prefix, where)
            n, width = int_field(c, "num_experts", where), int_field(c, "moe_intermediate_size", where)
            router = read_router(reader, prefix, cfg, n, int_field(c, "num_experts_per_tok", where),
                                 norm_topk_prob=flag(c, "norm_topk_prob", where))
            shared = None
            shared_width = int_field(c, "shared_expert_intermediate_size", where, default=0, minimum=0)
            if shared_width:
                shared = fill(DenseFFN(weights=(), hidden=cfg.hidden, intermediate=shared_width, act=cfg.act,
                                       fused=self.fused), reader, prefix + "shared_expert.")
            return MoE(router=router, experts=read_experts(reader, prefix, n, cfg, width, self.expert_names),
                       shared=shared, aux_loss_coef=number_field(c, "router_aux_loss_coef", 0.001, where))

    Reading.__name__ = Reading.__qualname__ = f"{dense.__name__}MoeReading"
    return Reading()


def _gate_up(p: dict[str, Expr]) -> Expr:
    """One expert's gate rows then its up rows: a fused expert's matrix as it is."""
    if "gate_up_proj.weight" in p:
        return p["gate_up_proj.weight"]
    return Concat((p["gate_proj.weight"], p["up_proj.weight"]), 0)


FAMILY = ComposeMoe()
