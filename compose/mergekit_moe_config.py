"""mergekit-moe YAML configs as specs: `compose build moe.yml` accepts a mergekit-moe config as it is.

The config becomes one `moe` of kind `from_experts` (mergekit/moe/config.py, 0.1.5): attention, norms and
embeddings from `base_model`; expert e of every layer is `experts[e].source_model`'s FFN; the router from
`gate_mode`; `experts_per_token` is top-k; `noise_scale` and `residual_scale` per expert (Gaussian noise
on gate/up/down, then the down projection scaled); `dtype` the output dtype. A shared expert (at most one,
as every mergekit-moe output takes) is that model's whole FFN in every layer: gated by one more router row
where mergekit writes Qwen MoE (the shared expert has prompts; or a `random` gate on Qwen2 models, or with
`architecture: qwen`), always on where mergekit writes DeepSeek MoE (no prompts). To know which, the base
model's config.json is read here, as mergekit reads it. Which checkpoint class is written is compose's
target pass's choice: Mixtral for Llama/Mistral experts, Qwen2-MoE with a shared expert (an always-on one
behind a zero gate with its down projection doubled, exact), Qwen3-MoE for Qwen3, as mergekit does, but
always with per-expert tensor names, which llama.cpp's converter reads (mergekit 0.1.5 writes Mixtral and
Qwen3-MoE experts fused, transformers 5's `experts.gate_up_proj`). `architecture` is checked against that
choice, and `deepseek` refused: compose does not write the Hub's remote-code DeepseekForCausalLM.

Gates, as mergekit/moe/router.py computes them: `hidden` (= `hidden_last`) and `hidden_avg` from the base
model's hidden states, `cheap_embed` from its token embeddings (lower/router.py, with its two documented
differences: one prompt at a time, float32), computed when the build writes them (never by `compose
inspect`), from at most 1024 prompts in all of at most 65536 characters each (compose.spec's bounds);
`random` is torch.randn of (layers, experts, hidden) and `uniform_random` torch.nn.Linear's uniform init,
both one draw from a generator seeded with 0, which is what `mergekit-moe --random-seed 0` draws
(mergekit without a seed draws something new every run).
`noise_scale` is compose's seeded per-tensor noise: the same distribution as mergekit's, not its
numbers (mergekit draws it from torch's global generator in its write order). Keys compose does not
handle are refused by name, never ignored.
"""
from __future__ import annotations

import math

from compose.errors import SpecError
from compose.mergekit_config import _ref
from compose.spec import MAX_PROMPT_CHARS, MAX_PROMPTS

KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}
GATES = {"hidden": "hidden", "hidden_last": "hidden", "hidden_avg": "hidden_avg", "cheap_embed": "cheap_embed",
         "random": "random", "uniform_random": "uniform_random"}
PROMPTED = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")
DTYPES = ("float32", "bfloat16", "float16")
SEED = 0
"""The seed of the random gates: mergekit-moe's `--random-seed 0` draws the same rows."""
ARCHITECTURES = ("Mixtral", "DeepSeek MoE", "Qwen MoE", "Qwen3 MoE")
"""mergekit-moe's output architectures, in the order it tries them (mergekit/moe/__init__.py)."""


def is_mergekit_moe_config(data: object) -> bool:
    """A mergekit-moe config: `experts` at the top level (compose's own specs have `model` there)."""
    return isinstance(data, dict) and "experts" in data and "model" not in data and "merge_method" not in data


def _prompts(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise SpecError(f"{where}: expected a list of prompt strings")
    if len(value) > MAX_PROMPTS:  # before looking at each: the list may be huge
        raise SpecError(f"{where}: {len(value)} prompts; compose takes at most {MAX_PROMPTS} in all (a build runs "
                        "the model once per prompt)")
    if not all(isinstance(p, str) for p in value):
        raise SpecError(f"{where}: expected a list of prompt strings")
    if any(not p for p in value):
        raise SpecError(f"{where}: an empty prompt")
    longest = max(range(len(value)), key=lambda i: len(value[i]))
    if len(value[longest]) > MAX_PROMPT_CHARS:
        raise SpecError(f"{where}[{longest}]: a prompt of {len(value[longest])} characters; compose takes at most "
                        f"{MAX_PROMPT_CHARS}")
    return value


def _number(value, where: str, minimum: float | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where}: expected a finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise SpecError(f"{where}: must be at least {minimum}, got {value!r}")
    return float(value)


def _expert(e, where: str) -> dict:
    if not isinstance(e, dict) or "source_model" not in e:
        raise SpecError(f"{where}: expected {{source_model: ..., positive_prompts: [...]}}")
    for key in e:
        if key not in EXPERT_KEYS:
            raise SpecError(f"{where}.{key}: not a mergekit-moe expert key compose knows")
    return {"ref": _ref(e["source_model"], f"{where}.source_model"),
            "positive": _prompts(e.get("positive_prompts"), f"{where}.positive_prompts"),
            "negative": _prompts(e.get("negative_prompts"), f"{where}.negative_prompts"),
            "noise": _number(e.get("noise_scale"), f"{where}.noise_scale", minimum=0.0),
            "scale": _number(e.get("residual_scale"), f"{where}.residual_scale")}


def _mergekit_architecture(data: dict, shared: dict | None, base: str, origin: str) -> str | None:
    """The output architecture mergekit-moe picks for this config (mergekit/scripts/moe.py,
    select_output_arch), or None where it has none (compose still builds those: Qwen2 experts without a
    shared expert as Qwen2-MoE, other families as generated code)."""
    from compose.sources import open_source

    from compose import families

    config = open_source(base).config  # mergekit asks every model; they must agree
    kind = str(config.get("model_type"))
    family = families.REGISTRY.get(kind)
    takes = family.mergekit_moe if family is not None else frozenset()
    gate = data.get("gate_mode", "hidden")
    supports = {
        "Mixtral": shared is None and "Mixtral" in takes,
        "DeepSeek MoE": (shared is None or not (shared["positive"] or shared["negative"])) and "DeepSeek MoE" in takes,
        "Qwen MoE": shared is not None and (gate == "random" or bool(shared["positive"])) and "Qwen MoE" in takes,
        "Qwen3 MoE": shared is None and "Qwen3 MoE" in takes,
    }
    wanted = data.get("architecture")
    names = [a for a in ARCHITECTURES if wanted is None or a.lower().startswith(str(wanted).lower())]
    if wanted is not None and not names:
        raise SpecError(f"{origin}: architecture: {wanted!r} names none of mergekit-moe's outputs "
                        f"({', '.join(ARCHITECTURES)})")
    fit = [a for a in names if supports[a]]
    if wanted is not None and not fit:
        raise SpecError(f"{origin}: architecture: {wanted!r} cannot hold this config ({kind} models, "
                        f"{'one' if shared else 'no'} shared expert)")
    return "Mixtral" if "Mixtral" in fit else (fit[0] if fit else None)


def translate(data: dict, origin: str) -> dict:
    """A mergekit-moe config -> the `model` of a compose BuildSpec (plain data, validated by the caller)."""
    for key in data:
        if key not in KEYS:
            raise SpecError(f"{origin}: {key}: not a mergekit-moe config key compose knows")
    if not data.get("base_model"):
        raise SpecError(f"{origin}: base_model: required")
    base = _ref(data["base_model"], f"{origin}: base_model")
    gate = data.get("gate_mode", "hidden")
    if gate not in GATES:
        raise SpecError(f"{origin}: gate_mode: {gate!r} is not one of {', '.join(GATES)}")
    if not isinstance(data.get("experts"), list) or not data["experts"]:
        raise SpecError(f"{origin}: experts: expected a non-empty list of experts")
    experts = [_expert(e, f"{origin}: experts[{i}]") for i, e in enumerate(data["experts"])]
    shared_list = data.get("shared_experts") or []
    if not isinstance(shared_list, list):
        raise SpecError(f"{origin}: shared_experts: expected a list of experts")
    if len(shared_list) > 1:
        raise SpecError(f"{origin}: shared_experts: {len(shared_list)} shared experts; mergekit-moe's outputs "
                        "take at most one (Qwen MoE, DeepSeek MoE), and so does compose")
    shared = _expert(shared_list[0], f"{origin}: shared_experts[0]") if shared_list else None
    total = sum(len(e[k] or []) for e in experts + ([shared] if shared else []) for k in ("positive", "negative"))
    if total > MAX_PROMPTS:
        raise SpecError(f"{origin}: experts: {total} prompts in all (positive_prompts and negative_prompts); compose "
                        f"takes at most {MAX_PROMPTS} (a build runs the model once per prompt)")

    top_k = data.get("experts_per_token", 2)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise SpecError(f"{origin}: experts_per_token: must be a positive integer, got {top_k!r}")
    if top_k > len(experts):
        raise SpecError(f"{origin}: experts_per_token: {top_k} is more than the {len(experts)} experts")
    dtype = data.get("dtype")
    if dtype is not None:
        dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise SpecError(f"{origin}: dtype: unsupported dtype {data['dtype']!r} (use {', '.join(DTYPES)})")

    if gate in PROMPTED:
        for i, e in enumerate(experts):
            if not e["positive"]:
                raise SpecError(f"{origin}: experts[{i}].positive_prompts: gate_mode {gate} needs at least one "
                                "prompt for every expert")
    arch = _mergekit_architecture(data, shared, base, origin) if shared or data.get("architecture") else None
    if data.get("architecture") is not None and arch == "DeepSeek MoE":
        raise SpecError(f"{origin}: architecture: compose does not write DeepseekForCausalLM (its modeling code "
                        "lives on the Hub); leave architecture out to get the same model, an always-on shared "
                        "expert, as Qwen2-MoE")
    gated = shared is not None and arch == "Qwen MoE"  # with prompts in the prompt modes, by its definition
    if shared is not None and not gated and shared["negative"]:
        raise SpecError(f"{origin}: shared_experts[0].negative_prompts: an always-on shared expert has no gate")

    def load(ref):
        return {"op": "load", "ref": ref, **({"dtype": dtype} if dtype else {})}

    everyone = experts + ([shared] if shared else [])
    if gate in PROMPTED:
        rows = experts + ([shared] if gated else [])
        router = {"init": GATES[gate], "prompts": [e["positive"] for e in rows],
                  "negative": [e["negative"] or [] for e in rows]}
    else:  # one draw of (layers, experts + shared, hidden), std 1 for `random`, as mergekit-moe's
        router = {"init": GATES[gate], "seed": SEED, "draw": "whole", **({"std": 1.0} if gate == "random" else {})}
    spec = {"op": "moe", "kind": "from_experts", "model": load(base), "experts": [load(e["ref"]) for e in experts],
            "top_k": top_k, "router": router, "seed": SEED}
    if shared is not None:
        spec.update(shared_expert=load(shared["ref"]), shared_gate=gated)
    if any(e["noise"] for e in everyone):
        spec["expert_noise"] = [e["noise"] or 0.0 for e in everyone]
    if any(e["scale"] is not None for e in everyone):
        spec["residual_scale"] = [1.0 if e["scale"] is None else e["scale"] for e in everyone]
    return spec
