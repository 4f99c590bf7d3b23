"""Which transformers class an MoE graph is written as, and the names and config that class reads.

- Mixtral (`MixtralForCausalLM`) when it fits exactly: every layer an MoE with the same expert count,
  width and top-k, renormalised top-k, no shared experts, and Llama/Mistral attention (no biases).
  Experts are written under the legacy per-expert keys `block_sparse_moe.experts.E.w1/w2/w3`, which
  transformers 5 loads and fuses (and which older transformers and other tools read as they are).
- Qwen2-MoE (`Qwen2MoeForCausalLM`) otherwise: it has dense layers (`mlp_only_layers`), a
  `norm_topk_prob` flag, q/k/v biases and a shared expert. Its shared expert is gated by
  sigmoid(shared_expert_gate(x)); we write that gate as zeros and the shared down projection doubled,
  since sigmoid(0) = 1/2 and both the doubling and the halving are exact in floating point: the shared
  experts then add exactly their own output, as DeepSeekMoE's ungated shared experts do.
- Anything else (o_proj biases, per-layer differences in the experts) is refused by name for now.
"""
from __future__ import annotations

from compose.errors import BuildError
from compose.ir import DecoderBlock, Graph, MoE
from compose.ir.weights import Expr, Scale, Zeros

_MIXTRAL_EXPERT = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_DENSE_ONLY_KEYS = ("attention_bias", "mlp_bias", "pretraining_tp", "use_sliding_window", "max_window_layers",
                    "layer_types", "architectures", "model_type", "torch_dtype", "_name_or_path")


def moe_blocks(g: Graph) -> list[tuple[int, MoE]]:
    return [(i, b.ffn) for i, (_, b) in enumerate(g.blocks()) if isinstance(b.ffn, MoE)]


def target(g: Graph) -> str:
    """`dense`, `mixtral` or `qwen2_moe`: the class the checkpoint is written for."""
    moes = moe_blocks(g)
    if not moes:
        return "dense"
    blocks = g.blocks()
    shapes = {(m.router.experts, m.router.top_k, m.intermediate, m.router.norm_topk_prob,
               m.shared.intermediate if m.shared else 0, m.jitter, m.aux_loss_coef) for _, m in moes}
    if len({m.shared_gate is None for _, m in moes if m.shared is not None}) > 1:
        raise BuildError("some shared experts are gated (Qwen2-MoE) and some are not; no class holds both yet")
    if len(shapes) != 1:
        raise BuildError(f"the MoE layers differ in experts, top_k, widths or routing {sorted(shapes)}; "
                         "no transformers class holds that yet")
    if any(b.attn.o_bias for _, b in blocks):
        raise BuildError("an MoE with o_proj biases (Llama attention_bias) has no transformers class yet")
    m = moes[0][1]
    if g.config.family == "qwen2" or g.config.qkv_bias:
        return "qwen2_moe"
    if len(moes) == len(blocks) and m.shared is None and m.router.norm_topk_prob:
        return "mixtral"
    return "qwen2_moe"


def block_tensors(kind: str, prefix: str, b: DecoderBlock) -> dict[str, Expr]:
    """A block's weights under the checkpoint names of `kind`."""
    params = b.params()
    if not isinstance(b.ffn, MoE) or kind == "dense":
        return {prefix + k: e for k, e in params.items()}
    out = {prefix + k: e for k, e in params.items() if not k.startswith("mlp.")}
    m = b.ffn
    if kind == "mixtral":
        out[prefix + "block_sparse_moe.gate.weight"] = m.router.params()["weight"]
        for e, x in enumerate(m.experts):
            for k, w in x.params().items():
                proj, _, leaf = k.partition(".")
                out[f"{prefix}block_sparse_moe.experts.{e}.{_MIXTRAL_EXPERT[proj]}.{leaf}"] = w
        return out
    out.update({prefix + k: e for k, e in params.items()
                if k.startswith("mlp.") and not k.startswith("mlp.shared_expert.")})
    h = m.hidden
    dtype = m.router.params()["weight"].dtype
    if m.shared is None:
        # Qwen2-MoE always has a shared expert: a zero-width one adds exactly 0.
        for k, shape in (("gate_proj", (0, h)), ("up_proj", (0, h)), ("down_proj", (h, 0))):
            out[f"{prefix}mlp.shared_expert.{k}.weight"] = Zeros(shape, dtype)
    else:
        # An always-on shared expert behind a zero gate (sigmoid(0) = 1/2) gets its down projection
        # doubled; a gated one (a Qwen2-MoE source) is written as it is.
        doubled = m.shared_gate is None
        for k, w in m.shared.params().items():
            out[f"{prefix}mlp.shared_expert.{k}"] = Scale(w, 2.0) if doubled and k.startswith("down_proj.") else w
    gate = m.shared_gate if m.shared_gate is not None else Zeros((1, h), dtype)
    out[prefix + "mlp.shared_expert_gate.weight"] = gate
    return out


def moe_config(g: Graph, cfg: dict, kind: str) -> dict:
    """The dense source config turned into `kind`'s config."""
    moes = moe_blocks(g)
    m = moes[0][1]
    c = g.config
    n = len(g.blocks())
    out = {k: v for k, v in cfg.items() if k not in _DENSE_ONLY_KEYS}
    out.update(num_experts_per_tok=m.router.top_k, router_aux_loss_coef=m.aux_loss_coef, output_router_logits=False,
               router_jitter_noise=m.jitter, head_dim=c.head_dim)
    if kind == "mixtral":
        out.update(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=m.router.experts,
                   intermediate_size=m.intermediate, sliding_window=c.sliding_window)
        return out
    moe_layers = {i for i, _ in moes}
    out.update(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=m.router.experts,
               intermediate_size=c.intermediate, moe_intermediate_size=m.intermediate,
               shared_expert_intermediate_size=m.shared.intermediate if m.shared else 0,
               norm_topk_prob=m.router.norm_topk_prob, decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(n) if i not in moe_layers], qkv_bias=c.qkv_bias,
               use_sliding_window=bool(c.sliding_window), sliding_window=c.sliding_window,
               max_window_layers=n,
               layer_types=["sliding_attention" if c.sliding_window else "full_attention"] * n)
    return out


def moe_manifest(g: Graph) -> dict | None:
    """compose.json's `moe` entry: the class, which layers route, experts, routing, active parameters."""
    moes = moe_blocks(g)
    if not moes:
        return None
    m = moes[0][1]
    cost = g.meta.get("cost", {})
    how = {k: v for k, v in g.meta.get("moe", {}).items() if k in ("kind", "segments", "shared_experts", "preserve")}
    return {**how, "class": ARCH_NAMES[target(g)], "moe_layers": [i for i, _ in moes],
            "routed_experts": m.router.experts, "top_k": m.router.top_k, "expert_intermediate": m.intermediate,
            "shared_intermediate": m.shared.intermediate if m.shared else 0,
            "shared_gate": "learned" if m.shared_gate is not None else ("always on" if m.shared else None),
            "norm_topk_prob": m.router.norm_topk_prob, "router_init": m.router.init or "from source",
            "router_jitter_noise": m.jitter, "router_aux_loss_coef": m.aux_loss_coef,
            "params": cost.get("params"), "active_params": cost.get("active_params")}


ARCH_NAMES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
