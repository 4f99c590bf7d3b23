"""Expert layouts the MoE families share: per-expert or stacked (fused) tensors on disk, and the checks
that a graph's MoE layers fit one class (one config.json describes every layer)."""
from __future__ import annotations

from compose.families.base import Reader, fill, moe_blocks
from compose.ir.config import ArchConfig
from compose.ir.graph import Graph
from compose.ir.nodes import DenseFFN, Router
from compose.ir.weights import Select, Slice



def read_experts(reader: Reader, prefix: str, n: int, cfg: ArchConfig, width: int,
                 names: dict[str, str]) -> tuple[DenseFFN, ...]:
    """n experts of `width` under `prefix` (`model.layers.3.mlp.`): transformers 5's and mergekit's stacked
    `experts.gate_up_proj` (E, 2 * width, hidden; gate rows, then up rows) and `experts.down_proj`
    (E, hidden, width) when the checkpoint has them, else per-expert `experts.E.<name>.weight`, `names`
    mapping each IR projection to the checkpoint's name for it."""
    h = cfg.hidden
    skeleton = DenseFFN(weights=(), hidden=h, intermediate=width, act=cfg.act)
    if reader.has(prefix + "experts.gate_up_proj"):
        gate_up = reader.load(prefix + "experts.gate_up_proj", (n, 2 * width, h))
        down = reader.load(prefix + "experts.down_proj", (n, h, width))
        return tuple(DenseFFN(weights=(("gate_proj.weight", Slice(Select(gate_up, e), 0, 0, width)),
                                       ("up_proj.weight", Slice(Select(gate_up, e), 0, width, 2 * width)),
                                       ("down_proj.weight", Select(down, e))),
                              hidden=h, intermediate=width, act=cfg.act)
                     for e in range(n))
    return tuple(_renamed(skeleton, reader, f"{prefix}experts.{e}.", names) for e in range(n))


def read_router(reader: Reader, prefix: str, cfg: ArchConfig, n: int, top_k: int, norm_topk_prob: bool) -> Router:
    """The top-k router of n experts under `prefix` (`gate.weight`, (n, hidden))."""
    return Router(weights=(("weight", reader.load(prefix + "gate.weight", (n, cfg.hidden))),), hidden=cfg.hidden,
                  experts=n, top_k=top_k, norm_topk_prob=norm_topk_prob)


def moe_config(g: Graph) -> dict:
    """Qwen2-MoE's config.json fields for the MoE layers of `g` (which refuse_mixed_layers found alike)."""
    moes = moe_blocks(g)
    m = moes[0][1]
    layers = {i for i, _ in moes}
    return {"num_experts": m.router.experts, "num_experts_per_tok": m.router.top_k,
            "moe_intermediate_size": m.intermediate, "norm_topk_prob": m.router.norm_topk_prob,
            "shared_expert_intermediate_size": m.shared.intermediate if m.shared else 0,
            "mlp_only_layers": [i for i in range(len(g.blocks())) if i not in layers],
            "router_aux_loss_coef": m.aux_loss_coef}


def _renamed(op: DenseFFN, reader: Reader, prefix: str, names: dict[str, str]) -> DenseFFN:
    weights = []
    for k, shape in op.expected().items():
        proj, _, leaf = k.partition(".")
        weights.append((k, reader.load(f"{prefix}{names[proj]}.{leaf}", shape)))
    return DenseFFN(weights=tuple(weights), hidden=op.hidden, intermediate=op.intermediate, act=op.act)


def refuse_mixed_layers(g: Graph) -> str | None:
    """One config.json describes every MoE layer: the same experts, top-k, widths, routing and gating."""
    moes = moe_blocks(g)
    shapes = {(m.router.experts, m.router.top_k, m.intermediate, m.router.norm_topk_prob,
               m.shared.intermediate if m.shared else 0, m.jitter, m.aux_loss_coef) for _, m in moes}
    if len(shapes) > 1:
        return (f"its MoE layers differ in (experts, top_k, width, norm_topk_prob, shared width, jitter, "
                f"aux loss) {sorted(shapes)}")
    if len({m.shared_gate is None for _, m in moes if m.shared is not None}) > 1:
        return "some of its shared experts are gated and some are not"
    return None


def dense_layer(reader: Reader, prefix: str, cfg: ArchConfig, width: int) -> DenseFFN:
    return fill(DenseFFN(weights=(), hidden=cfg.hidden, intermediate=width, act=cfg.act), reader, prefix)

