"""Lowering of `moe` specs: dense blocks -> blocks whose FFN is an MoE (Router + experts + shared FFN).

Experts are weight expressions over the dense FFNs (loads, row/column slices, seeded noise, zeros), so
nothing is copied until the backend writes it. Router rows from data (hidden states, embeddings) are the
one exception: they are computed here, once, by compose.router_init.
"""
from __future__ import annotations

import dataclasses

from compose.errors import SourceError, SpecError
from compose.ir import DecoderBlock, DenseFFN, Graph, MoE, Router
from compose.ir.weights import Concat, Const, Expr, Noise, Slice, Zeros, derive_seed
from compose.spec import MoESpec


def lower_moe(spec: MoESpec, path: str) -> Graph:
    from compose.lower import lower_one

    g = lower_one(spec.model, f"{path}.model")
    blocks = [b for _, b in g.blocks()]
    n = len(blocks)
    for i, b in enumerate(blocks):
        if not isinstance(b.ffn, DenseFFN):
            raise SpecError(f"{path}.model: layer {i} is already a mixture of experts; {spec.kind} takes dense models")
        if b.ffn.bias:
            raise SpecError(f"{path}.model: MLPs with biases (mlp_bias) cannot become experts yet")
    layers = _moe_layers(spec, n, path)
    donors = _expert_graphs(spec, g, path) if spec.kind == "from_experts" else []
    count = {"upcycle": spec.num_experts, "from_experts": len(donors), "fine_grained": spec.routed}[spec.kind]
    if spec.top_k > count:
        raise SpecError(f"{path}.top_k: {spec.top_k} is more than the {count} routed experts")
    if spec.kind == "fine_grained":
        _check_fine_grained(spec, g.config.intermediate, path)
    rows = _router_rows(spec, g, count, path)

    out = []
    for i, b in enumerate(blocks):
        if i not in layers:
            out.append(b)
            continue
        if spec.kind == "upcycle":
            experts, shared = [_noisy(b.ffn, spec, i, e) for e in range(count)], None
        elif spec.kind == "from_experts":
            experts, shared = [_noisy(d[i].ffn, spec, i, e) for e, d in enumerate(donors)], None
        else:
            experts, shared = _fine_grained(b.ffn, spec, i)
        router = Router(weights=(("weight", rows(i)),), hidden=g.config.hidden, experts=count, top_k=spec.top_k,
                        norm_topk_prob=spec.norm_topk_prob, init=_describe(spec))
        moe = MoE(router=router, experts=tuple(experts), shared=shared, jitter=spec.jitter,
                  aux_loss_coef=spec.aux_loss_coef)
        out.append(dataclasses.replace(b, ffn=moe))

    from compose.lower import _rebuild, _unused

    meta = {"moe": _summary(spec, count, layers, g.config.intermediate)}
    return _rebuild(g, out, _unused(g), meta)


def _moe_layers(spec: MoESpec, n: int, path: str) -> set[int]:
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


def _expert_graphs(spec: MoESpec, base: Graph, path: str) -> list[list[DecoderBlock]]:
    from compose.lower import lower_one

    n, cfg = len(base.blocks()), base.config
    donors = []
    for e, s in enumerate(spec.experts):
        where = f"{path}.experts[{e}]"
        g = lower_one(s, where)
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


def _check_fine_grained(spec: MoESpec, inter: int, path: str) -> None:
    if inter % spec.segments:
        raise SpecError(f"{path}.segments: {spec.segments} does not divide the intermediate size {inter}")
    if spec.preserve and spec.shared and inter % spec.shared:
        raise SpecError(f"{path}.shared: with preserve=True the dense FFN is cut into the shared experts, "
                        f"and {spec.shared} does not divide the intermediate size {inter}")


def _noisy(ffn: DenseFFN, spec: MoESpec, layer: int, expert: int) -> DenseFFN:
    """An expert copy, with seeded noise on each weight when asked (one stream per layer, expert and name)."""
    if not spec.noise:
        return ffn
    return ffn.with_weights(**{k: Noise(e, spec.noise, derive_seed(spec.seed, "noise", layer, expert, k))
                               for k, e in ffn.params().items()})


def _segment(ffn: DenseFFN, j: int, width: int) -> dict[str, Expr]:
    """Rows [j*w, (j+1)*w) of gate and up and the matching columns of down: one fine-grained expert."""
    p = ffn.params()
    lo, hi = j * width, (j + 1) * width
    return {"gate_proj.weight": Slice(p["gate_proj.weight"], 0, lo, hi),
            "up_proj.weight": Slice(p["up_proj.weight"], 0, lo, hi),
            "down_proj.weight": Slice(p["down_proj.weight"], 1, lo, hi)}


def _ffn(weights: dict[str, Expr], like: DenseFFN, width: int) -> DenseFFN:
    return DenseFFN(weights=tuple(weights.items()), hidden=like.hidden, intermediate=width, act=like.act)


def _fine_grained(ffn: DenseFFN, spec: MoESpec, layer: int) -> tuple[list[DenseFFN], DenseFFN | None]:
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


def _router_rows(spec: MoESpec, g: Graph, count: int, path: str):
    """layer -> the router weight expression (count, hidden)."""
    r, cfg = spec.router, g.config
    shape = (count, cfg.hidden)
    if r.init == "zeros":
        return lambda i: Zeros(shape, cfg.dtype)
    if r.init == "random":
        return lambda i: Noise(Zeros(shape, cfg.dtype), r.std, derive_seed(r.seed, "router", i))
    from compose.ir.evaluate import torch_dtype
    from compose.router_init import gate_vectors

    vecs = gate_vectors(g, r, count, path).to(torch_dtype(cfg.dtype))
    return lambda i: Const.of(f"{r.init} router layer {i}", vecs[i])


def _describe(spec: MoESpec) -> str:
    r = spec.router
    if r.init == "random":
        return f"random(std={r.std}, seed={r.seed})"
    if r.init in ("hidden", "hidden_avg", "cheap_embed"):
        return f"{r.init}({sum(map(len, r.prompts))} prompts)"
    return r.init


def _summary(spec: MoESpec, count: int, layers: set[int], inter: int) -> dict:
    s = {"kind": spec.kind, "routed_experts": count, "top_k": spec.top_k, "layers": sorted(layers),
         "norm_topk_prob": spec.norm_topk_prob, "router": _describe(spec)}
    if spec.kind == "fine_grained":
        s.update(segments=spec.segments, expert_intermediate=inter // spec.segments,
                 shared_experts=spec.shared, preserve=spec.preserve)
    return s


# -- MoE checkpoints as sources ---------------------------------------------------------------------------

_MIXTRAL_PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def moe_from_source(src, cfg, i: int, path: str):
    """Layer i's FFN of a Mixtral or Qwen2-MoE checkpoint (per-expert keys, or transformers 5's and
    mergekit's fused `experts.gate_up_proj`/`experts.down_proj`); a Qwen2-MoE dense layer is a DenseFFN."""
    from compose.ir import Load
    from compose.ir.nodes import make
    from compose.ir.weights import Select

    c = src.config
    mixtral = src.family == "mixtral"
    keys = set(src.keys())
    legacy = mixtral and f"model.layers.{i}.block_sparse_moe.gate.weight" in keys
    p = f"model.layers.{i}." + ("block_sparse_moe." if legacy else "mlp.")

    def load(key: str) -> Load:
        if key not in keys:
            raise SourceError(f"{src.ref}: no tensor {key} (needed by {path})")
        shape, dtype = src.meta(key)
        return Load(src.ref, key, shape, dtype)

    if not mixtral and p + "gate.weight" not in keys:  # a Qwen2-MoE dense layer (mlp_only_layers)
        return make(DenseFFN, {k: load(p + k) for k in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")},
                    hidden=cfg.hidden, intermediate=int(c["intermediate_size"]), act=cfg.act)
    n = int(c["num_local_experts"] if mixtral else c["num_experts"])
    width = int(c["intermediate_size"] if mixtral else c["moe_intermediate_size"])
    experts = []
    fused = p + "experts.gate_up_proj" in keys
    for e in range(n):
        if fused:
            gu, down = Select(load(p + "experts.gate_up_proj"), e), Select(load(p + "experts.down_proj"), e)
            w = {"gate_proj.weight": Slice(gu, 0, 0, width), "up_proj.weight": Slice(gu, 0, width, 2 * width),
                 "down_proj.weight": down}
        else:
            name = (lambda k: _MIXTRAL_PROJ[k]) if mixtral else (lambda k: k)
            w = {f"{k}.weight": load(f"{p}experts.{e}.{name(k)}.weight") for k in ("gate_proj", "up_proj", "down_proj")}
        experts.append(make(DenseFFN, w, hidden=cfg.hidden, intermediate=width, act=cfg.act))
    router = Router(weights=(("weight", load(p + "gate.weight")),), hidden=cfg.hidden, experts=n,
                    top_k=int(c["num_experts_per_tok"]),
                    norm_topk_prob=True if mixtral else bool(c.get("norm_topk_prob", False)))
    shared = gate = None
    shared_width = 0 if mixtral else int(c.get("shared_expert_intermediate_size") or 0)
    if shared_width:
        shared = make(DenseFFN, {k: load(f"{p}shared_expert.{k}") for k in
                                 ("gate_proj.weight", "up_proj.weight", "down_proj.weight")},
                      hidden=cfg.hidden, intermediate=shared_width, act=cfg.act)
        gate = load(p + "shared_expert_gate.weight")
    return MoE(router=router, experts=tuple(experts), shared=shared, shared_gate=gate,
               jitter=float(c.get("router_jitter_noise", 0.0) or 0.0),
               aux_loss_coef=float(c.get("router_aux_loss_coef", 0.001)))
