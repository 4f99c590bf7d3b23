"""compose.json: what a build records beside the weights (the spec, the IR hash, provenance, trainable
names, cost, the class written, the MoE layout, the sha256 of every file written)."""
from __future__ import annotations

from compose.families.base import moe_blocks
from compose.ir import Graph, graph_hash


def moe_entry(g: Graph) -> dict | None:
    """The `moe` entry: the class, which layers route, experts, routing, active parameters."""
    moes = moe_blocks(g)
    if not moes:
        return None
    m = moes[0][1]
    cost = g.state.cost
    layout = g.state.moe
    how = {}
    if layout is not None:
        how = {"kind": layout.kind, **{k: getattr(layout, k) for k in ("segments", "shared_experts", "preserve")
                                       if getattr(layout, k) is not None}}
    return {**how, "class": g.state.target.architecture, "moe_layers": [i for i, _ in moes],
            "routed_experts": m.router.experts, "top_k": m.router.top_k, "expert_intermediate": m.intermediate,
            "shared_intermediate": m.shared.intermediate if m.shared else 0,
            "shared_gate": "learned" if m.shared_gate is not None else ("always on" if m.shared else None),
            "norm_topk_prob": m.router.norm_topk_prob, "router_init": m.router.init or "from source",
            "router_jitter_noise": m.jitter, "router_aux_loss_coef": m.aux_loss_coef,
            "params": cost.params if cost else None, "active_params": cost.active_params if cost else None}


def manifest(g: Graph, *, version: str, spec: dict, formats: list[str], passes: list[str], tensors: dict,
             trainable: list[str], shards: dict, onnx: dict | None, files: list[str], sha256: dict[str, str]) -> dict:
    out = {
        "compose_version": version,
        "spec": spec,
        "formats": formats,
        "dtype": g.config.dtype,
        "passes": passes,
        "ir_hash": graph_hash(g),
        "target": {"class": g.state.target.architecture, "model_type": g.state.target.family},
        "cost": g.state.cost.as_dict() if g.state.cost else {},
    }
    if (moe := moe_entry(g)) is not None:
        out["moe"] = moe
    out.update({
        "layers": [{"index": i, "from": b.origin.describe(), "source": b.origin.source,
                    "source_layer": b.origin.layer, "new": b.origin.new, "merged": b.origin.method,
                    "identity_at_init": bool(b.identity), "trainable": bool(b.trainable)}
                   for i, (_, b) in enumerate(g.blocks())],
        "trainable": trainable,
        "provenance": {k: str(e) for k, e in tensors.items()},
        "shards": shards,
    })
    if onnx:
        out["onnx"] = onnx
    out["files"] = sorted(files + ["compose.json"])
    out["sha256"] = sha256  # every file but compose.json itself, which holds them
    return out
