"""Lowering of `moe` specs: dense blocks -> blocks whose FFN is an MoE (Router + experts + shared FFN).

Experts are weight expressions over the dense FFNs (loads, row/column slices, seeded noise, zeros), so
nothing is copied until the backend writes it. Router rows from data (hidden states, embeddings) are
constants computed once by lower/router.py when the build first evaluates one (never while lowering:
`compose inspect` does not run the model); mergekit-moe's random rows are drawn here, in one draw.
"""
from __future__ import annotations

import dataclasses

from compose.errors import SpecError
from compose.ir.graph import Graph
from compose.ir.nodes import DecoderBlock, DenseFFN, MoE, Router
from compose.ir.state import MoELayout
from compose.ir.weights import Concat, Const, Expr, Noise, Scale, Slice, Zeros, derive_seed
from compose.lower.common import hand_written, rebuild, unused
from compose.lower.limits import check_experts


def lower(spec, path: str, ctx) -> Graph:
    g = ctx.input(spec.model, f"{path}.model")
    hand_written(g, f"{path}.model", f"{spec.kind} (a mixture of experts)")
    blocks = [b for _, b in g.blocks()]
    n = len(blocks)
    for i, b in enumerate(blocks):
        if not isinstance(b.ffn, DenseFFN):
            raise SpecError(f"{path}.model: layer {i} is already a mixture of experts; {spec.kind} takes dense models")
        if b.ffn.bias:
            raise SpecError(f"{path}.model: MLPs with biases (mlp_bias) cannot become experts yet")
    layers = _moe_layers(spec, n, path)
    count = {"upcycle": spec.num_experts, "from_experts": len(spec.experts or []), "fine_grained": spec.routed}[spec.kind]
    field = {"upcycle": "num_experts", "from_experts": "experts", "fine_grained": "routed"}[spec.kind]
    extra = spec.shared_expert is not None
    check_experts(count + spec.shared + extra, len(layers), f"{path}.{field}")
    donors = _expert_graphs(spec.experts, "experts", g, path, ctx) if spec.kind == "from_experts" else []
    shared_donor = _expert_graphs([spec.shared_expert], "shared_expert", g, path, ctx)[0] if extra else None
    if spec.top_k > count:
        raise SpecError(f"{path}.top_k: {spec.top_k} is more than the {count} routed experts")
    if spec.kind == "fine_grained":
        _check_fine_grained(spec, g.config.intermediate, path)
    # Router rows: one per routed expert, then the shared expert's gate row. A random draw covers the shared
    # expert gated or not (as mergekit-moe draws it), so the routed rows do not depend on its gate.
    drawn = spec.router.init in ("random", "uniform_random")
    rows = _router_rows(spec, g, count + (extra if drawn else spec.shared_gate), path, ctx)

    out = []
    for i, b in enumerate(blocks):
        if i not in layers:
            out.append(b)
            continue
        if spec.kind == "upcycle":
            experts, shared = [_noisy(b.ffn, spec, i, e) for e in range(count)], None
        elif spec.kind == "from_experts":
            experts = [_noisy(d[i].ffn, spec, i, e) for e, d in enumerate(donors)]
            shared = _noisy(shared_donor[i].ffn, spec, i, count) if extra else None
        else:
            experts, shared = _fine_grained(b.ffn, spec, i)
        weight, gate = rows(i), None
        if spec.shared_gate:  # the shared expert's row is the last: Qwen2-MoE's shared_expert_gate
            gate = Slice(weight, 0, count, count + 1)
        if weight.shape[0] != count:
            weight = Slice(weight, 0, 0, count)
        router = Router(weights=(("weight", weight),), hidden=g.config.hidden, experts=count, top_k=spec.top_k,
                        norm_topk_prob=spec.norm_topk_prob, init=_describe(spec))
        moe = MoE(router=router, experts=tuple(experts), shared=shared, shared_gate=gate, jitter=spec.jitter,
                  aux_loss_coef=spec.aux_loss_coef)
        out.append(dataclasses.replace(b, ffn=moe))

    return rebuild(g, out, unused(g), moe=_layout(spec))


def _moe_layers(spec, n: int, path: str) -> set[int]:
    if spec.layers is not None:
        bad = [i for i in spec.layers if i >= n]
        if bad:
            raise SpecError(f"{path}.layers: {bad} out of range for a model of {n} layers (0..{n - 1})")
        chosen = set(spec.layers)
    else:
        chosen = {i for i in range(spec.first_k_dense, n) if (i + 1) % spec.every == 0}
    if not chosen:
        raise SpecError(f"{path}: no layer becomes a mixture of experts (check layers, every, first_k_dense)")
    return chosen


def _expert_graphs(specs, field: str, base: Graph, path: str, ctx) -> list[list[DecoderBlock]]:
    n, cfg = len(base.blocks()), base.config
    donors = []
    for e, s in enumerate(specs):
        where = f"{path}.{field}" + (f"[{e}]" if field == "experts" else "")
        g = ctx.input(s, where)
        hand_written(g, where, "a mixture of experts")
        blocks = [b for _, b in g.blocks()]
        if len(blocks) != n:
            raise SpecError(f"{where}: {len(blocks)} layers, but the base has {n}")
        if g.config.hidden != cfg.hidden:
            raise SpecError(f"{where}: hidden size {g.config.hidden} differs from the base's {cfg.hidden}")
        first = donors[0][0].ffn.intermediate if donors else blocks[0].ffn.intermediate
        for i, b in enumerate(blocks):
            if not isinstance(b.ffn, DenseFFN) or b.ffn.bias:
                raise SpecError(f"{where}: layer {i} has no plain dense FFN to use as an expert")
            if b.ffn.intermediate != first:
                raise SpecError(f"{where}: experts of different widths: layer {i}'s FFN is {b.ffn.intermediate} "
                                f"wide, experts[0]'s {first}")
        donors.append(blocks)
    return donors


def _check_fine_grained(spec, inter: int, path: str) -> None:
    if inter % spec.segments:
        raise SpecError(f"{path}.segments: {spec.segments} does not divide the intermediate size {inter}")
    if spec.preserve and spec.shared and inter % spec.shared:
        raise SpecError(f"{path}.shared: with preserve=True the dense FFN is cut into the shared experts, "
                        f"and {spec.shared} does not divide the intermediate size {inter}")


def _noisy(ffn: DenseFFN, spec, layer: int, expert: int) -> DenseFFN:
    """An expert copy, with seeded noise on each weight when asked (one stream per layer, expert and name),
    then its down projection times the expert's residual_scale (mergekit-moe's order: noise, then scale)."""
    std = spec.expert_noise[expert] if spec.expert_noise is not None else spec.noise
    scale = spec.residual_scale[expert] if spec.residual_scale is not None else 1.0
    if not std and scale == 1.0:
        return ffn
    weights = ffn.params()
    if std:
        weights = {k: Noise(e, std, derive_seed(spec.seed, "noise", layer, expert, k)) for k, e in weights.items()}
    if scale != 1.0:
        weights = {k: Scale(e, scale) if k.startswith("down_proj.") else e for k, e in weights.items()}
    return ffn.with_weights(**weights)


def _segment(ffn: DenseFFN, j: int, width: int) -> dict[str, Expr]:
    """Rows [j*w, (j+1)*w) of gate and up and the matching columns of down: one fine-grained expert (of a
    fused gate_up_proj, those rows of each half)."""
    p = ffn.params()
    lo, hi = j * width, (j + 1) * width
    if ffn.fused:
        gate_up, inter = p["gate_up_proj.weight"], ffn.intermediate
        gate, up = Slice(gate_up, 0, lo, hi), Slice(gate_up, 0, inter + lo, inter + hi)
    else:
        gate, up = Slice(p["gate_proj.weight"], 0, lo, hi), Slice(p["up_proj.weight"], 0, lo, hi)
    return {"gate_proj.weight": gate, "up_proj.weight": up, "down_proj.weight": Slice(p["down_proj.weight"], 1, lo, hi)}


def _ffn(weights: dict[str, Expr], like: DenseFFN, width: int) -> DenseFFN:
    """An FFN of `width` from separate gate/up/down weights, fused as `like` is (gate's rows, then up's)."""
    if like.fused:
        weights = {"gate_up_proj.weight": Concat((weights["gate_proj.weight"], weights["up_proj.weight"]), 0),
                   "down_proj.weight": weights["down_proj.weight"]}
    return DenseFFN(weights=tuple(weights.items()), hidden=like.hidden, intermediate=width, act=like.act,
                    fused=like.fused)


def _fine_grained(ffn: DenseFFN, spec, layer: int) -> tuple[list[DenseFFN], DenseFFN | None]:
    """DeepSeekMoE experts for one layer.

    Routed expert e is segment e % m (m = segments), with seeded noise when asked. Without `preserve`,
    shared expert s is segment s % m as well, the shared experts concatenated into one FFN. With
    `preserve`, the shared part is the dense FFN itself (so its output is the dense FFN's, bit for bit)
    and every routed expert's down projection is zero, so the routed part adds exactly 0 at init
    whichever experts the router picks; training then grows the routed experts from zero.
    """
    w = ffn.intermediate // spec.segments
    routed = []
    for e in range(spec.routed):
        weights = _segment(ffn, e % spec.segments, w)
        if spec.noise:
            weights = {k: Noise(x, spec.noise, derive_seed(spec.seed, "noise", layer, e, k)) for k, x in weights.items()}
        if spec.preserve:
            down = weights["down_proj.weight"]
            weights["down_proj.weight"] = Zeros(down.shape, down.dtype)
        routed.append(_ffn(weights, ffn, w))
    if spec.preserve:
        return routed, ffn
    if not spec.shared:
        return routed, None
    parts = [_segment(ffn, s % spec.segments, w) for s in range(spec.shared)]
    shared = {k: Concat(tuple(p[k] for p in parts), 1 if k.startswith("down") else 0) for k in parts[0]}
    return routed, _ffn(shared, ffn, w * spec.shared)


def _router_rows(spec, g: Graph, count: int, path: str, ctx):
    """layer -> the router weight expression (count, hidden)."""
    r, cfg = spec.router, g.config
    shape = (count, cfg.hidden)
    if r.init == "zeros":
        return lambda i: Zeros(shape, cfg.dtype)
    if r.init == "random" and r.draw == "per_layer":
        return lambda i: Noise(Zeros(shape, cfg.dtype), r.std, derive_seed(r.seed, "router", i))
    from compose.ir import graph_hash
    from compose.ir.evaluate import torch_dtype
    from compose.lower.router import later_gate_vectors, random_rows

    if r.init in ("random", "uniform_random"):
        vecs = random_rows(r, len(g.blocks()), count, cfg.hidden).to(torch_dtype(cfg.dtype))
        return lambda i: Const.of(f"{r.init} router layer {i}", vecs[i])
    rows = later_gate_vectors(g, r, count, path, ctx, torch_dtype(cfg.dtype))
    # What the rows depend on: the prompts and the base model (its IR names its sources and tokenizer).
    recipe = repr((r.init, r.prompts, r.negative, count, graph_hash(g)))
    return lambda i: Const.later(f"{r.init} router layer {i}", shape, cfg.dtype, f"{recipe}:{i}", lambda: rows()[i])


def _describe(spec) -> str:
    r = spec.router
    if r.init == "random":
        return f"random(std={r.std}, seed={r.seed}" + (", whole draw)" if r.draw == "whole" else ")")
    if r.init == "uniform_random":
        return f"uniform_random(seed={r.seed}" + (", whole draw)" if r.draw == "whole" else ")")
    if r.init in ("hidden", "hidden_avg", "cheap_embed"):
        return f"{r.init}({sum(map(len, r.prompts))} prompts)"
    return r.init


def _layout(spec) -> MoELayout:
    """What the MoE nodes do not say about how they were made."""
    if spec.kind == "fine_grained":
        return MoELayout(spec.kind, segments=spec.segments, shared_experts=spec.shared, preserve=spec.preserve)
    return MoELayout(spec.kind)
