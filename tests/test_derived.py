"""Every decoder transformers can build (issue 25): a family derived from transformers' own class.

Each model type without a compose module is built tiny with transformers' own classes (tests/derived_zoo.py),
saved, and composed: LLaMA-Pro must leave the fp32 logits bit-identical (image+text too for the VL classes),
SOLAR and a two-model stack must copy every layer byte for byte with the per-layer config fields following the
layer map, and the output must load as the same class with no missing or unexpected keys.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import derived_zoo as zoo
from mergekit_derived import SLICES, compare, merge_config, mergekit_runs, run_mergekit

from compose import families
from compose.pipeline import build

TYPES = sorted(t for t in zoo.CASES if t not in families.SOURCES)
TEXT = [t for t in TYPES if t not in zoo.VL]
VISION = [t for t in TYPES if t in zoo.VL]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """model_type -> (seed -> folder): each tiny checkpoint saved once per run."""
    root, made = tmp_path_factory.mktemp("derived"), {}

    def get(t: str, seed: int = 0) -> Path:
        if (t, seed) not in made:
            made[t, seed] = zoo.save(root / f"{t}-{seed}", t, seed=seed)
        return made[t, seed]

    return get


def run(spec: dict, out: Path) -> Path:
    path = out.with_suffix(".json")
    path.write_text(json.dumps(spec))
    return build(str(path), out, progress=False)


def load(folder: Path, t: str):
    model, info = zoo.model_class(t).from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def stack_prefix(t: str, folder: Path) -> str:
    from compose.families.derived import derivation

    return derivation(json.loads((folder / "config.json").read_text()), t).saved_stack


def text_config(folder: Path, t: str) -> dict:
    config = json.loads((folder / "config.json").read_text())
    return config["text_config"] if t in zoo.VL else config


def per_layer(config: dict, t: str) -> dict[str, list]:
    """What each per-layer field says of each layer, as transformers' own config class reads the file (a step
    field aside: it generates a list the class fills in, and that list is compared)."""
    from compose.families import layer_fields
    from compose.families.derived import build_config

    full = build_config(config if t not in zoo.VL else {**config, "text_config": config["text_config"]})
    text = full.get_text_config(decoder=True).to_dict()
    fields, _ = layer_fields.find(text, text["num_hidden_layers"])
    n = text["num_hidden_layers"]
    return {f: [layer_fields.value(kind, text[f], i, n) for i in range(n)] for f, kind in fields if kind != "step"}


def check_layer_map(out: Path, sources: list[tuple[Path, int]], t: str) -> None:
    """Output layer j is source layer sources[j], byte for byte, and every per-layer field says of it what the
    source's said of that layer."""
    got = tensors(out)
    prefix = stack_prefix(t, out)
    read = {src: (tensors(src), per_layer(json.loads((src / "config.json").read_text()), t)) for src, _ in sources}
    for j, (src, i) in enumerate(sources):
        mine = {k[len(f"{prefix}.{j}."):]: v for k, v in got.items() if k.startswith(f"{prefix}.{j}.")}
        theirs = {k[len(f"{prefix}.{i}."):]: v for k, v in read[src][0].items() if k.startswith(f"{prefix}.{i}.")}
        assert mine.keys() == theirs.keys() and mine
        for k in mine:
            assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), (j, k)
    fields = per_layer(json.loads((out / "config.json").read_text()), t)
    for f, said in fields.items():
        assert said == [read[src][1][f][i] for src, i in sources], f


@pytest.mark.parametrize("t", TYPES)
def test_llama_pro_is_an_exact_identity(checkpoints, tmp_path, t):
    src = checkpoints(t)
    out = run({"model": {"op": "expand_blocks", "model": {"op": "load", "ref": str(src)}, "groups": 2,
                         "per_group": 1}}, tmp_path / "out")
    a, b = load(src, t), load(out, t)
    inputs = [zoo.text_inputs(t)] + ([zoo.image_inputs(t)] if t in zoo.VL else [])
    with torch.no_grad():
        for x in inputs:
            assert torch.equal(a(**x).logits, b(**x).logits)
    assert text_config(out, t)["num_hidden_layers"] == 6
    manifest = json.loads((out / "compose.json").read_text())
    assert [layer["identity_at_init"] for layer in manifest["layers"]] == [False, False, True, False, False, True]


@pytest.mark.parametrize("t", TYPES)
def test_solar_copies_layers_and_follows_the_layer_map(checkpoints, tmp_path, t):
    src = checkpoints(t)
    out = run({"model": {"op": "depth_upscale", "model": {"op": "load", "ref": str(src)}, "drop": 1}},
              tmp_path / "out")
    load(out, t)
    check_layer_map(out, [(src, i) for i in (0, 1, 2, 1, 2, 3)], t)


@pytest.mark.parametrize("t", TYPES)
def test_two_model_stack(checkpoints, tmp_path, t):
    a, b = checkpoints(t), checkpoints(t, seed=1)
    out = run({"model": {"op": "stack", "slices": [
        {"op": "layers", "model": {"op": "load", "ref": str(a)}, "start": 0, "stop": 3},
        {"op": "layers", "model": {"op": "load", "ref": str(b)}, "start": 2, "stop": 4}]}}, tmp_path / "out")
    load(out, t)
    check_layer_map(out, [(a, 0), (a, 1), (a, 2), (b, 2), (b, 3)], t)
    got, first, last = tensors(out), tensors(a), tensors(b)
    prefix = stack_prefix(t, out)
    for k, v in got.items():  # outside the stack: the first model's stem, the last model's tail
        if not k.startswith(prefix + "."):
            assert torch.equal(v, first[k]) or torch.equal(v, last[k]), k


@pytest.mark.parametrize("t", sorted(t for t in families.TINY.values()))
def test_hand_written_families_name_what_the_derivation_names(t):
    """A hand-written family's checkpoint names and shapes are the ones read from transformers' class."""
    from compose.families.derived import derivation
    from compose.sources import TINY_DEFAULTS

    fam = families.get(t)
    config = fam.tiny_config({**TINY_DEFAULTS, **fam.tiny_options})
    assert fam.checkpoint_shapes(config, t) == derivation(config, t).names()


MERGES = {  # (mergekit config over checkpoints a, b, c; mergekit's own tensor merge: base index, parameters)
    "linear": (lambda a, b, c: merge_config("linear", [a, b]), lambda a, b, c: ([a, b], None),
               {"weight": [0.3, 0.7]}),
    "ties": (lambda a, b, c: merge_config("ties", [b, c], base=a), lambda a, b, c: ([a, b, c], 0),
             {"weight": [0.3, 0.7], "density": [0.5, 0.5]}),
    "slerp": (lambda a, b, c: merge_config("slerp", [a, b]), lambda a, b, c: ([a, b], 0), {"t": 0.4}),
}


@pytest.mark.parametrize("method", sorted(MERGES))
@pytest.mark.parametrize("t", TYPES)
def test_merges_equal_mergekit(checkpoints, tmp_path, t, method):
    """The mergekit YAML is the spec. Where mergekit 0.1.5 merges the type itself (tests/mergekit_derived.py
    says where it does not: it drops or re-lays some types' tensors), its output is compared tensor by tensor;
    elsewhere each tensor is compared with mergekit's own merge method run on the same tensors."""
    import yaml

    from mergekit_ref import mergekit_merge

    a, b, c = (checkpoints(t, seed) for seed in range(3))
    config_of, inputs_of, params = MERGES[method]
    config = config_of(a, b, c)
    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump(config))
    ours = build(str(spec), tmp_path / "ours", progress=False)
    load(ours, t)
    if mergekit_runs(t):
        run_mergekit(config, tmp_path / "mergekit")
        assert compare(ours, tmp_path / "mergekit") == []
        return
    folders, base = inputs_of(a, b, c)
    sources = [tensors(f) for f in folders]
    got = tensors(ours)
    assert got.keys() == sources[0].keys()
    for k, v in got.items():
        assert torch.equal(v, mergekit_merge(method, [s[k] for s in sources], base, k, **params)), k


GRADIENT = {"t": [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": [0.2, 0.7]}]}
MERGEKIT_ONE_LAYER_MODULES = {"qwen2_5_vl": "visual.merger.mlp."}
"""mergekit's architecture JSON makes Qwen2.5-VL's projector a module of one layer (t = 1 there); compose puts
tensors outside every stack of layers at t = 0, as mergekit does for a module's pre- and post-weights."""


@pytest.mark.parametrize("t", [t for t in VISION if mergekit_runs(t)])
def test_gradients_run_over_each_tower_as_mergekit_does(checkpoints, tmp_path, t):
    """A slerp whose t runs over the layers: the language model's layers and the vision tower's blocks each
    take t = i / (L - 1) of their own stack, as mergekit's modules do."""
    import yaml

    a, b = checkpoints(t), checkpoints(t, seed=1)
    config = merge_config("slerp", [a, b], **GRADIENT)
    spec = tmp_path / "merge.yaml"
    spec.write_text(yaml.safe_dump(config))
    ours = build(str(spec), tmp_path / "ours", progress=False)
    run_mergekit(config, tmp_path / "mergekit")
    differ = compare(ours, tmp_path / "mergekit")
    known = MERGEKIT_ONE_LAYER_MODULES.get(t)
    assert [k for k in differ if known is None or not k.startswith(known)] == []


@pytest.mark.parametrize("t", TYPES)
def test_passthrough_yaml(checkpoints, tmp_path, t):
    """mergekit's passthrough slices as the spec: each layer from its slice, byte for byte, with its per-layer
    fields; where mergekit writes slices by its own rule (tests/mergekit_derived.py SLICES), the same tensors
    as mergekit."""
    import yaml

    a, b = checkpoints(t), checkpoints(t, seed=1)
    config = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]}]}
    spec = tmp_path / "passthrough.yaml"
    spec.write_text(yaml.safe_dump(config))
    ours = build(str(spec), tmp_path / "ours", progress=False)
    load(ours, t)
    check_layer_map(ours, [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)], t)
    if t in SLICES:
        run_mergekit(config, tmp_path / "mergekit")
        assert compare(ours, tmp_path / "mergekit") == []


@pytest.mark.parametrize("t", ["glm4_moe", "deepseek_v3"])
def test_half_models_keep_what_transformers_keeps_in_float32(checkpoints, tmp_path, t):
    """A bfloat16 GLM-4.5 or DeepSeek-V3 holds its routers' weights and score-correction biases in float32
    (transformers' _keep_in_fp32_modules_strict): LLaMA-Pro keeps them so, and the logits stay bit-identical."""
    half = tmp_path / "bf16"
    zoo.model_class(t).from_pretrained(checkpoints(t), dtype=torch.bfloat16).save_pretrained(half)
    kept = {k for k, v in tensors(half).items() if v.dtype == torch.float32}
    assert any("e_score_correction_bias" in k for k in kept)
    out = run({"model": {"op": "expand_blocks", "model": {"op": "load", "ref": str(half)}, "groups": 2}},
              tmp_path / "out")
    written = tensors(out)
    assert {k for k, v in written.items() if v.dtype == torch.float32} >= kept
    a = zoo.model_class(t).from_pretrained(half, dtype=torch.bfloat16).eval()
    b = zoo.model_class(t).from_pretrained(out, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(a(**zoo.text_inputs(t)).logits, b(**zoo.text_inputs(t)).logits)


@pytest.fixture(scope="session")
def gemma4_shared(tmp_path_factory):
    """A Gemma 4 whose last two of 8 layers reuse earlier layers' keys and values (num_kv_shared_layers), with
    full-attention layers of their own head size (per_layer_config)."""
    from transformers import AutoConfig

    t = "gemma4_text"
    config = {k: v for k, v in zoo.config(t, layers=8).to_dict().items() if k != "model_type"}
    config["num_kv_shared_layers"] = 2
    torch.manual_seed(0)
    model = zoo.model_class(t).from_config(AutoConfig.for_model(t, **config), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("gemma4-shared") / "src"
    model.save_pretrained(folder)
    return folder


def test_shared_kv_layers_stay_trailing(gemma4_shared, tmp_path):
    """SOLAR over 8 layers makes 12: the two shared-KV layers stay last, and the per-layer head sizes follow
    their layers (transformers writes those keys zero-padded past 9 layers)."""
    t, src = "gemma4_text", gemma4_shared
    out = run({"model": {"op": "depth_upscale", "model": {"op": "load", "ref": str(src)}, "drop": 2}},
              tmp_path / "out")
    load(out, t)
    check_layer_map(out, [(src, i) for i in (0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7)], t)
    assert text_config(out, t)["num_kv_shared_layers"] == 2


@pytest.mark.parametrize("position", [1, 6])
def test_llama_pro_next_to_shared_kv_layers(gemma4_shared, tmp_path, position):
    """A copy of a layer before the shared ones, or of a shared one (which then shares too): exact."""
    t, src = "gemma4_text", gemma4_shared
    out = run({"model": {"op": "expand_blocks", "model": {"op": "load", "ref": str(src)}, "positions": [position]}},
              tmp_path / "out")
    a, b = load(src, t), load(out, t)
    with torch.no_grad():
        assert torch.equal(a(**zoo.text_inputs(t)).logits, b(**zoo.text_inputs(t)).logits)
    assert text_config(out, t)["num_kv_shared_layers"] == (3 if position >= 6 else 2)


HUB_LAYOUT = {  # how the Hub's checkpoints (and those transformers 4.5x saved) name what 5.x saves otherwise
    "gemma3": (("vision_tower.", "vision_tower.vision_model."), ("language_model.model.", "model.language_model.")),
    "llava": (("vision_tower.", "vision_tower.vision_model."), ("language_model.model.", "model.language_model."),
              ("language_model.lm_head.", "lm_head.")),
}


@pytest.mark.parametrize("t", sorted(HUB_LAYOUT))
def test_checkpoints_in_another_layout_transformers_reads(checkpoints, tmp_path, t):
    """A checkpoint named as the Hub's Gemma 3 and LLaVA are (which transformers loads through its own renaming)
    is read under the names transformers saves, and LLaMA-Pro of it is exact on text and image+text; a merge
    of it with a checkpoint in the save layout pairs the same tensors."""
    import shutil

    from safetensors.torch import save_file

    src = checkpoints(t)
    hub = Path(shutil.copytree(src, tmp_path / "hub"))
    renamed = {}
    for k, v in tensors(src).items():
        old, new = next(((a, b) for a, b in HUB_LAYOUT[t] if k.startswith(a)), ("", ""))
        renamed[new + k[len(old):]] = v
    save_file(renamed, hub / "model.safetensors", metadata={"format": "pt"})
    assert set(renamed) != set(tensors(src))
    out = run({"model": {"op": "expand_blocks", "model": {"op": "load", "ref": str(hub)}, "groups": 2}},
              tmp_path / "out")
    assert set(tensors(out)) >= set(tensors(src))
    a, b = load(hub, t), load(out, t)
    with torch.no_grad():
        for x in (zoo.text_inputs(t), zoo.image_inputs(t)):
            assert torch.equal(a(**x).logits, b(**x).logits)
    merged = run({"model": {"op": "merge", "method": "linear", "models": [
        {"model": {"op": "load", "ref": str(hub)}, "parameters": {"weight": 0.5}},
        {"model": {"op": "load", "ref": str(src)}, "parameters": {"weight": 0.5}}]}}, tmp_path / "merged")
    assert all(torch.equal(v, tensors(src)[k]) for k, v in tensors(merged).items())  # the same model twice


@pytest.mark.parametrize("t", ["olmo2", "glm4_moe", "gemma3", "qwen2_5_vl"])
def test_a_peft_adapter_folds_as_peft_merges_it(checkpoints, tmp_path, t):
    """`model+adapter` on a derived family: PEFT names modules as the class holds them in memory
    (`model.language_model.layers.*`), the checkpoint as it stores them; the fold equals PEFT's own
    merge_and_unload."""
    from peft import LoraConfig, PeftModel, get_peft_model

    src = checkpoints(t)
    # o_proj, not down_proj: in an MoE, PEFT would take the experts' stacked down_proj as a raw parameter.
    targets = r".*language_model.*\.(q_proj|o_proj)" if t in zoo.VL else ["q_proj", "o_proj"]
    torch.manual_seed(0)
    peft = get_peft_model(zoo.model_class(t).from_pretrained(src), LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    out = run({"model": {"op": "load", "ref": f"{src}+{tmp_path / 'adapter'}"}}, tmp_path / "out")
    merged = PeftModel.from_pretrained(zoo.model_class(t).from_pretrained(src), tmp_path / "adapter")
    merged = merged.merge_and_unload().eval()
    ours = load(out, t)
    with torch.no_grad():
        for x in [zoo.text_inputs(t)] + ([zoo.image_inputs(t)] if t in zoo.VL else []):
            assert (merged(**x).logits - ours(**x).logits).abs().max() <= 1e-6
