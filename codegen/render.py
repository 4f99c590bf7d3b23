"""Fill templates/modeling.py.j2 from a Graph: the source of a standalone, readable PyTorch module.

The renderer decides everything that can be decided at build time (biases, activation, rope type, which
layers slide, tied head, GQA repeat, the family's features) and the template emits only that path: the
generated code has no flags to branch on. It reads hyper-parameters only, never weights.
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import jinja2

from compose import families
from compose.codegen.rope import rope_attrs
from compose.errors import BuildError
from compose.families.base import moe_blocks
from compose.ir import DenseFFN, Graph

TEMPLATES = Path(__file__).parent / "templates"

# Hugging Face `hidden_act` -> the call that computes it on `self.gate_proj(x)`, matching transformers'
# ACT2FN (silu/swish: F.silu; gelu: the exact erf form; gelu_pytorch_tanh: torch's tanh approximation).
ACTIVATIONS = {
    "silu": ("silu", "F.silu({})"),
    "swish": ("silu", "F.silu({})"),
    "gelu": ("gelu", "F.gelu({})"),
    "gelu_pytorch_tanh": ("gelu_tanh", 'F.gelu({}, approximate="tanh")'),
}

DTYPES = ("float32", "bfloat16", "float16", "float64")

# The family features (compose.families.base.Features) the templates implement.
SUPPORTED_FEATURES = {"norm": ("rms", "offset_rms"), "mlp": ("gated",), "attention": ("rope",)}

ROPE_DOCS = {
    "default": "theta ** (-2i / head_dim)",
    "linear": "theta ** (-2i / head_dim) / factor (linear position interpolation)",
    "dynamic": "NTK-aware scaling, theta grown once the sequence passes max_position_embeddings",
    "llama3": "Llama 3.1's: low frequencies divided by factor, a smooth ramp to the high ones",
    "yarn": "YaRN's blend of interpolated and extrapolated frequencies",
    "longrope": "LongRoPE's per-frequency factors, short or long by the sequence's length",
}


@lru_cache(maxsize=None)
def _template(name: str) -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        undefined=jinja2.StrictUndefined,  # a missing value is a compose bug: fail, never render ""
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(name)


def _shared_block_attrs(graph: Graph) -> dict:
    """The per-block choices, which must agree across blocks: the module has a single Block class."""
    blocks = graph.blocks()
    if not blocks:
        raise BuildError("the torch backend needs at least one decoder block; the graph has none")
    c = graph.config
    want = {"heads": c.heads, "kv_heads": c.kv_heads, "head_dim": c.head_dim, "hidden": c.hidden,
            "intermediate": c.intermediate, "act": c.act, "eps": c.rms_eps}
    first_name, first = blocks[0]
    choice = {"qkv_bias": first.attn.qkv_bias, "o_bias": first.attn.o_bias, "mlp_bias": first.ffn.bias,
              "qk_norm": first.attn.qk_norm, "fused": first.attn.fused, "sandwich": first.sandwich}
    for name, b in blocks:
        # An MoE's experts have their own width (checked by the hf backend's choice of class).
        inter = b.ffn.intermediate if isinstance(b.ffn, DenseFFN) else c.intermediate
        got = {"heads": b.attn.heads, "kv_heads": b.attn.kv_heads, "head_dim": b.attn.head_dim,
               "hidden": b.hidden, "intermediate": inter, "act": b.ffn.act,
               "eps": b.input_norm.eps}
        for k in want:
            if got[k] != want[k]:
                raise BuildError(f"node {name}: {k}={got[k]} differs from the model's {k}={want[k]}; "
                                 "the torch backend emits one Block class shared by every layer")
        mine = {"qkv_bias": b.attn.qkv_bias, "o_bias": b.attn.o_bias, "mlp_bias": b.ffn.bias,
                "qk_norm": b.attn.qk_norm, "fused": b.attn.fused, "sandwich": b.sandwich}
        if isinstance(b.ffn, DenseFFN) and b.ffn.fused != b.attn.fused:
            raise BuildError(f"node {name}: fused attention and separate MLP projections (or the reverse); the "
                             "torch backend fuses both or neither")
        for k in choice:
            if mine[k] != choice[k]:
                raise BuildError(f"node {name}: {k}={mine[k]} differs from {first_name}'s {k}={choice[k]}; "
                                 "the torch backend emits one Block class shared by every layer")
    return choice


def _family(graph: Graph) -> families.Family:
    """The family the generated module reproduces: the target pass's choice, else (the models inside a
    composite, which get no target of their own) the graph's dense family."""
    if graph.state.target is not None:
        return families.get(graph.state.target.family)
    if moe_blocks(graph):
        raise BuildError("an MoE graph needs the target pass before code generation (which class it reproduces)")
    return families.get(graph.config.family)


def _features(graph: Graph, family: families.Family) -> families.Features:
    """The features the template follows: the dense family's (norms, embeddings, attention, MLP) with the
    target class's MoE choices (a Gemma MoE written as generated code keeps Gemma's norms)."""
    moe = {k: getattr(family.features, k) for k in ("moe_shared_gate", "moe_weights_in_model_dtype")}
    return dataclasses.replace(families.get(graph.config.family).features, **moe)


def _check_features(family: families.Family, features: families.Features) -> None:
    for name, supported in SUPPORTED_FEATURES.items():
        value = getattr(features, name)
        if value not in supported:
            raise BuildError(f"the torch backend has no {name} {value!r} (family {family.model_type}; "
                             f"supported: {', '.join(supported)})")


def _window_attrs(graph: Graph) -> dict:
    """Which layers slide: none, all (one window), or some (`layer_types`, one window size)."""
    windows = [b.attn.window for _, b in graph.blocks()]
    sizes = sorted({w for w in windows if w is not None})
    if len(sizes) > 1:
        name = next(n for n, b in graph.blocks() if b.attn.window == sizes[1])
        raise BuildError(f"node {name}: sliding window {sizes[1]} differs from the model's {sizes[0]}; the torch "
                         "backend emits one window size")
    window = sizes[0] if sizes else None
    mixed = window is not None and None in windows
    return {"sliding_window": window, "mixed_layers": mixed,
            "layer_types": tuple("full_attention" if w is None else "sliding_attention" for w in windows)}


def _rope_attrs(graph: Graph) -> dict:
    """The rope the template bakes in, and a second, local one for sliding layers when it differs
    (Gemma 3): the template then makes cos/sin per layer type. When every layer slides (or none does)
    there is one rope, the one those layers use."""
    c = graph.config
    local = c.local_rope if c.local_rope not in (None, c.rope) else None
    sliding = [b.attn.window is not None for _, b in graph.blocks()]
    if local is None or not any(sliding):
        return {**rope_attrs(c), "local_rope_theta": None}
    if all(sliding):
        return {**rope_attrs(dataclasses.replace(c, rope=local)), "local_rope_theta": None}
    if local.type != "default" or local.partial_rotary_factor not in (None, 1.0):
        raise BuildError(f"the torch backend's sliding layers take a default rope; local rope {local.describe()} "
                         "is not supported yet")
    return {**rope_attrs(c), "local_rope_theta": repr(local.theta)}


def _number(v: float | None) -> str | None:
    return None if v is None else repr(float(v))


def render_modeling(graph: Graph) -> str:
    """The source of modeling_compose.py for `graph` (a verified decoder-only Graph)."""
    c = graph.config
    family = _family(graph)
    features = _features(graph, family)
    _check_features(family, features)
    if c.act not in ACTIVATIONS:
        raise BuildError(f"the torch backend has no activation {c.act!r} (supported: {', '.join(ACTIVATIONS)})")
    if c.dtype not in DTYPES:
        raise BuildError(f"the torch backend has no dtype {c.dtype!r} (supported: {', '.join(DTYPES)})")
    if c.heads % c.kv_heads:
        raise BuildError(f"{c.heads} attention heads are not a multiple of {c.kv_heads} kv heads")
    choice = _shared_block_attrs(graph)
    rope = _rope_attrs(graph)
    act_doc, act_call = ACTIVATIONS[c.act]
    return _template("modeling.py.j2").render(
        **_moe_attrs(graph, family, features),
        **rope,
        **_window_attrs(graph),
        rope_doc=ROPE_DOCS[rope["rope_type"]],
        act_fn=act_call,
        family=c.family,
        hf_class=family.architecture,
        vocab_size=c.vocab,
        n_layer=len(graph.blocks()),
        n_embd=c.hidden,
        intermediate_size=c.intermediate,
        n_head=c.heads,
        n_kv_head=c.kv_heads,
        n_rep=c.heads // c.kv_heads,
        head_dim=c.head_dim,
        norm_eps=repr(float(c.rms_eps)),
        max_positions=c.max_positions,
        dtype=c.dtype,
        tied=graph.head.tied,
        qkv_bias=choice["qkv_bias"],
        o_bias=choice["o_bias"],
        mlp_bias=choice["mlp_bias"],
        qk_norm=choice["qk_norm"],
        **_fusion_attrs(graph, choice["fused"]),
        sandwich=choice["sandwich"],
        offset_norm=features.norm == "offset_rms",
        embed_scale=features.embed_scale,
        hf_entry=family.generated and graph.composite is None,
        query_scale=_number(c.query_scale),
        attn_softcap=_number(c.attn_softcap),
        final_softcap=_number(c.final_softcap),
        fused_act_call=act_call.format("gate"),
        act_doc=act_doc,
        act_call=act_call.format("self.gate_proj(x)"),
    )


def _fusion_attrs(graph: Graph, checkpoint_fused: bool) -> dict:
    """Which projections the module holds fused: those the checkpoint holds fused (Phi-3), and those the
    fusion passes chose (state.fusion), which it concatenates as it loads (`load_*`)."""
    f = graph.state.fusion
    if moe_blocks(graph) and f.experts != "stacked":
        raise BuildError("the generated module holds MoE experts stacked: run the stack-experts pass")
    load_qkv = f.qkv and not checkpoint_fused
    load_gate_up = f.gate_up and not checkpoint_fused
    parts = {}
    if load_qkv:
        parts["qkv_proj"] = ("q_proj", "k_proj", "v_proj")
    if load_gate_up:
        parts["gate_up_proj"] = ("gate_proj", "up_proj")
    return {"fuse_qkv": checkpoint_fused or f.qkv, "load_qkv": load_qkv,
            "fuse_gate_up": checkpoint_fused or f.gate_up, "load_gate_up": load_gate_up, "fused_parts": parts}


def _moe_attrs(graph: Graph, family: families.Family, f: families.Features) -> dict:
    """The MoE settings the template needs, from the class the checkpoint is written for."""
    moes = moe_blocks(graph)
    if not moes:
        return {"moe": False}
    m = moes[0][1]
    proj = {v: k for k, v in family.expert_names.items()}  # checkpoint name -> IR projection
    return {"moe": True, "n_experts": m.router.experts, "top_k": m.router.top_k,
            "expert_size": m.intermediate, "shared_size": m.shared.intermediate if m.shared else 0,
            "norm_topk_prob": m.router.norm_topk_prob, "moe_layers": tuple(i for i, _ in moes),
            "aux_loss_coef": repr(float(m.aux_loss_coef)), "moe_shared_gate": f.moe_shared_gate,
            "moe_shared": f.moe_shared_gate or m.shared is not None,
            "moe_weights_in_model_dtype": f.moe_weights_in_model_dtype,
            "moe_prefix": family.expert_prefix, "expert_proj": proj,
            "expert_proj_example": next(k for k, v in proj.items() if v == "gate_proj")}


def render_files(graph: Graph) -> dict[str, str]:
    """File name -> source of the generated module(s) for `graph`, each checked to read back (see
    `check_source`).

    One model: modeling_compose.py. CALM: the anchor's and the augmenting model's own modules (the same
    template as for one model), the CALM module joining them, and the transformers wrapper that
    config.json's auto_map names."""
    return {name: check_source(name, source) for name, source in _render_files(graph).items()}


def check_source(name: str, source: str) -> str:
    """`source` if it is Python whose every literal reads back: a value Python cannot write as a literal
    (repr(nan) is `nan`, a name) would make the module fail at import, or worse, name something else."""
    import ast

    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as e:
        raise BuildError(f"generated {name} line {e.lineno} is not valid Python ({e.msg}); a bug in compose's "
                         "templates") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in ("nan", "inf", "infinity"):
            raise BuildError(f"generated {name} line {node.lineno}: a non-finite value ({node.id}) in a "
                             "hyper-parameter; check the source's config.json")
    return source


def _wrapper(kind: str, forward: str, cache_class: str, model_type: str) -> str:
    """modeling_compose_hf.py: the transformers classes config.json's auto_map names, around the module's
    `forward` function and cache class; `kind` (single, calm, cogvlm) picks the inputs it takes."""
    return _template("hf_wrapper.py.j2").render(kind=kind, forward=forward, cache_class=cache_class,
                                                model_type=model_type)


def _render_files(graph: Graph) -> dict[str, str]:
    kind = graph.composite
    if kind is None:
        files = {"modeling_compose.py": render_modeling(graph)}
        family = _family(graph)
        if family.generated:  # written as this code behind an auto_map: the transformers wrapper too
            files["modeling_compose_hf.py"] = _wrapper("single", "compose_forward", "KVCache", family.model_type)
        return files
    if kind == "cogvlm":
        return _render_cogvlm(graph)
    from compose.ir import CrossAttention, LMHead, Norm
    from compose.ir.nodes import make
    from compose.ir.weights import Ones

    (prefix, side_cfg), = graph.side_configs.items()
    anchor = Graph.decoder(graph.config, graph.embedding, [b for _, b in graph.blocks()], graph.final_norm,
                           graph.head)
    dead = set(graph.dead())
    side = [b for n, b in graph.side_blocks(prefix) if n not in dead]
    h = side_cfg.hidden
    augment = Graph.decoder(side_cfg, graph.op(f"{prefix}.embed"), side,
                            make(Norm, {"weight": Ones((h,), side_cfg.dtype)}, dim=h, eps=side_cfg.rms_eps),
                            make(LMHead, {"weight": graph.op(f"{prefix}.embed").params()["weight"]},
                                 vocab=side_cfg.vocab, hidden=h, tied=True))
    cross = [op for _, op in graph.items() if isinstance(op, CrossAttention)]
    glue = _template("calm.py.j2").render(
        anchor_family=graph.config.family, anchor_layers=len(anchor.blocks()), anchor_width=graph.config.hidden,
        augment_family=side_cfg.family, augment_layers=len(side), augment_width=h,
        pairs=tuple(graph.state.calm.pairs), heads=cross[0].heads, dtype=graph.config.dtype,
        tied=graph.head.tied, final_softcap=graph.config.final_softcap is not None)
    wrapper = _wrapper("calm", "calm_forward", "CalmCache", families.COMPOSITE)
    return {"modeling_compose_anchor.py": render_modeling(anchor),
            "modeling_compose_augment.py": render_modeling(augment),
            "modeling_compose.py": glue, "modeling_compose_hf.py": wrapper}


def _render_cogvlm(graph: Graph) -> dict[str, str]:
    """The language model's own module, the CogVLM module around it, and the transformers wrapper."""
    language = Graph.decoder(graph.config, graph.embedding,
                             [dataclasses.replace(b, vision=None) for _, b in graph.blocks()], graph.final_norm,
                             graph.head)
    c = graph.config
    block = _shared_block_attrs(graph)
    glue = _template("cogvlm.py.j2").render(family=c.family, n_layer=len(graph.blocks()), n_embd=c.hidden,
                                            vision_width=graph.adapter.vision_width, dtype=c.dtype,
                                            tied=graph.head.tied, n_rep=c.heads // c.kv_heads,
                                            mixed_layers=_window_attrs(graph)["mixed_layers"],
                                            qk_norm=block["qk_norm"], sandwich=block["sandwich"], fused=block["fused"],
                                            local_rope=_rope_attrs(graph)["local_rope_theta"] is not None,
                                            final_softcap=c.final_softcap is not None)
    wrapper = _wrapper("cogvlm", "cogvlm_forward", "CogVLMCache", families.COMPOSITE)
    return {"modeling_compose_language.py": render_modeling(language), "modeling_compose.py": glue,
            "modeling_compose_hf.py": wrapper}
