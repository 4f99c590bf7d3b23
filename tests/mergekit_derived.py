"""mergekit 0.1.5 as the reference for merges of derived-family models (issue 25): which model types it
merges in full, the config dicts to run it (the same dicts are mergekit YAML that `compose build` takes),
and a tensor-by-tensor comparison of two output folders.

The support table comes from real runs: tiny checkpoints of transformers 5.25's own classes, saved with
save_pretrained, merged by mergekit 0.1.5 (linear, ties, slerp), the output's tensor names compared with the
input's and loaded back through transformers (missing keys = dropped tensors)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import read_tensors
from test_mergekit_peer import run_mergekit  # noqa: F401 (re-exported: in-process, CPU, no random methods)

SUPPORTED = frozenset({
    # no JSON definition: inferred from transformers' own class (mergekit/architecture/auto.py)
    "qwen3_5_text", "gpt_oss", "gemma4_text", "olmo3", "ministral3", "smollm3", "exaone4", "ernie4_5",
    "seed_oss", "hunyuan_v1_dense", "llama4_text", "glm", "helium", "nemotron",
    # a JSON definition (mergekit/_data/architectures) that covers every tensor
    "arcee", "apertus", "phi", "glm4", "cohere2", "granite", "olmo2", "starcoder2", "stablelm",
    # image-text-to-text: vision tower + projector + language model, all merged
    "qwen3_5", "gemma4", "mistral3", "qwen2_5_vl", "llama4",
})
"""Model types whose every checkpoint tensor mergekit 0.1.5 merges and writes under the checkpoint's own
name. Left out, and why:
- RELAID (below): all merged, but written in another layout than the checkpoint's.
- deepseek_v3, dots1, ernie4_5_moe: the routed experts are silently dropped (and ernie4_5_moe's
  moe_statics.e_score_correction_bias). Their first layers are dense, so the expert tensors are "optional",
  and mergekit's planner (plan.py plan_tensor) skips an optional tensor whose name is not in the checkpoint
  as it is, before its transformers key conversion could build it. With no dense layer they are RELAID.
- cohere: its JSON definition requires q_norm and k_norm, which CohereConfig's default (use_qk_norm=False,
  Command R) has not: an error. With use_qk_norm=True (Command R+) every tensor is merged.
- llava: no JSON definition, and the inferred one drops the whole language model and lm_head (only the
  vision tower and projector are written).
- gemma3 (Gemma3ForConditionalGeneration): its JSON definition expects the hub layout
  vision_tower.vision_model.*; a checkpoint saved by transformers 5.25 has vision_tower.*: an error. (In
  the hub layout it runs, but drops the SigLIP pooling head when vision_use_head is set.)
- qwen3_vl: its JSON definition has exactly 3 DeepStack mergers (visual.deepstack_merger_list.0-2, as the real
  Qwen3-VL), so the tiny zoo's one-merger vision tower is an error ("required but not present").
- gpt_neox: its JSON definition requires the old attention.bias / masked_bias / rotary_emb.inv_freq
  buffers, which transformers 5.25 does not save: an error."""

RELAID = frozenset({"qwen3_next", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "hunyuan_v1_moe",
                    "glm4_moe"})
"""Every tensor merged, but the per-expert checkpoint tensors (experts.N.gate_proj...) come out in
transformers' fused in-memory layout (experts.gate_up_proj, experts.down_proj; granitemoe's router and
phimoe's block_sparse_moe renamed too), so `compare` by name cannot match them: `compare_loaded` can. mergekit
merges each fused tensor as one, so only elementwise methods (linear, task arithmetic) agree with a merge of
the per-expert tensors: ties' top-k and slerp's angle are taken over all experts at once."""


SLICES = frozenset({"arcee", "apertus", "phi", "glm4", "granite", "olmo2", "starcoder2", "stablelm"})
"""The types whose passthrough `slices` mergekit 0.1.5 writes as mergekit's own passthrough rule says (the
first slice's embeddings, the last slice's final norm and head, num_hidden_layers updated): those with a JSON
definition. For the types it infers, mergekit takes the final norm and head from the first model and leaves
num_hidden_layers as it was (a broken output); for cohere2 it leaves layer_types at the old depth, so the
config it writes is rejected by transformers' Cohere2Config."""


def mergekit_runs(model_type: str) -> bool:
    return model_type in SUPPORTED


def merge_config(method: str, models: list[Path], base: Path | None = None, **params) -> dict:
    """A mergekit config over whole models, in float32: linear (weights 0.3, 0.7), ties (the same weights,
    density 0.5; needs `base`), slerp (t 0.4; its base is one of the two models, the first by default).
    `weights` and `density` are per-model; every other keyword is a global parameter (t, normalize...)."""
    weights = params.pop("weights", (0.3, 0.7))
    density = params.pop("density", 0.5)
    per_model = {"linear": lambda w: {"weight": w}, "ties": lambda w: {"weight": w, "density": density}}
    if method == "slerp":
        base = base or models[0]
        params.setdefault("t", 0.4)
        entries = [{"model": str(m)} for m in models]
    elif method in per_model:
        if len(weights) != len(models):
            raise ValueError(f"{len(models)} models but {len(weights)} weights")
        entries = [{"model": str(m), "parameters": per_model[method](w)} for m, w in zip(models, weights)]
    else:
        raise ValueError(f"no default config for {method}")
    if method == "ties" and base is None:
        raise ValueError("ties needs a base model")
    config = {"merge_method": method, "dtype": "float32", "models": entries}
    if base is not None:
        config["base_model"] = str(base)
    if params:
        config["parameters"] = params
    return config


def compare(ours: Path, theirs: Path) -> list[str]:
    """The tensor names in one output only, or whose dtype, shape or values differ (exactly), sorted."""
    a, b = read_tensors(Path(ours)), read_tensors(Path(theirs))
    return sorted(k for k in a.keys() | b.keys()
                  if k not in a or k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]))


def compare_loaded(ours: Path, theirs: Path) -> list[str]:
    """`compare` in transformers' own layout: both outputs loaded by their config's class, which reads either
    checkpoint layout (per-expert or fused). A tensor either checkpoint lacks comes back as a missing key."""
    import transformers

    def load(folder: Path):
        arch = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
        model, info = getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32,
                                                                  output_loading_info=True)
        return model.state_dict(), set(info["missing_keys"])

    (a, gone_a), (b, gone_b) = load(ours), load(theirs)
    return sorted(gone_a | gone_b | {k for k in a.keys() | b.keys()
                                     if k not in a or k not in b or not torch.equal(a[k], b[k])})
