"""mergekit-moe configs as specs (compose/mergekit_moe_config.py): the same YAML built by compose and by
mergekit-moe 0.1.5 (its own command, `--random-seed 0`, on CPU) gives the same tensors, on tiny local Llama
and Qwen3 models with word-level tokenizers made here (nothing downloaded). mergekit writes Mixtral and
Qwen3-MoE experts fused (`mlp.experts.gate_up_proj`), compose per expert; the comparison splits mergekit's
fused tensors into compose's names, and transformers loads both into the same state dict.

Copied tensors (attention, norms, embeddings, experts, residual-scaled experts) must be equal bit for bit,
and so must the random gates (`random`, `uniform_random`: one draw after mergekit's seed) and `cheap_embed`
(float32 sums in both). `hidden` gates differ by design: mergekit runs the base model in bfloat16 on a
padded batch, compose in float32 one prompt at a time (lower/router.py). The prompts of each expert have
one token length, so no padding differs, and the YAML's dtype is float32, so only bfloat16's rounding
remains: unit rows whose components agree to 1.5e-2 (8 mantissa bits, 2^-9 relative per rounding, through
the model's few layers; about 3e-3 is seen), and to 1e-5 when mergekit's own code runs the model in
float32. `noise_scale` noise is compared by its statistics: mergekit draws it from torch's global
generator in write order, compose from a seed per tensor."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compose.cli import main
from compose.errors import SpecError
from compose.pipeline import load_spec
from conftest import read_tensors

peer = pytest.mark.peer
ROOT = Path(__file__).resolve().parent.parent
SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = ("def import numpy class return once upon a time there was the derivative of integral sum hello "
         "bonjour je suis code story math french").split()


def _save(folder: Path, family: str, seed: int) -> Path:
    """A tiny model of transformers' own class (norm gains perturbed, so a norm from the wrong model shows)
    with a word-level tokenizer whose bos is `<s>`, as mergekit-moe and compose both prepend it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen3Config

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS)}
    args = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=False)
    cfg = {"llama": lambda: LlamaConfig(**args), "qwen2": lambda: Qwen2Config(**args),
           "qwen3": lambda: Qwen3Config(**args, head_dim=16)}[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Path:
    """root/{llama,qwen2,qwen3}/{base,a,b,c}: a base and three experts of each family."""
    pytest.importorskip("mergekit")
    root = tmp_path_factory.mktemp("moe_zoo")
    for family in ("llama", "qwen2", "qwen3"):
        for seed, name in enumerate(["base", "a", "b", "c"]):
            _save(root / family / name, family, seed)
    return root


def _expert(model: str, *prompts: str, **kw) -> dict:
    return {"source_model": model, **({"positive_prompts": list(prompts)} if prompts else {}), **kw}


# Each expert's prompts have one token length (after bos), so mergekit's padded batch has no padding.
CONFIGS = {
    "hidden": {"base_model": "base", "gate_mode": "hidden", "dtype": "float32", "experts": [
        _expert("a", "def import numpy", "class return sum"),
        _expert("b", "once upon a time", negative_prompts=["hello"]),
        _expert("c", "the derivative of", "the integral of")]},
    "hidden_avg": {"base_model": "base", "gate_mode": "hidden_avg", "dtype": "float32", "experts_per_token": 1,
                   "experts": [_expert("a", "def import numpy"), _expert("b", "once upon a time there")]},
    "cheap_embed": {"base_model": "base", "gate_mode": "cheap_embed", "dtype": "float32", "experts": [
        _expert("a", "def import", "numpy class return"), _expert("b", "once upon", negative_prompts=["math"]),
        _expert("c", "bonjour je suis")]},
    "random": {"base_model": "base", "gate_mode": "random", "dtype": "float32", "experts_per_token": 1,
               "experts": [_expert("a"), _expert("b"), _expert("c"), _expert("base")]},
    "uniform_random": {"base_model": "base", "gate_mode": "uniform_random", "dtype": "float32", "experts": [
        _expert("a", "code"), _expert("b", "story", residual_scale=0.5)]},
    # Qwen MoE: a shared expert gated by its prompts' row; residual_scale on an expert and the shared one.
    # (mergekit reads a shared expert only from the base or an expert: its loaders hold only those.)
    "qwen_shared": {"base_model": "base", "gate_mode": "hidden", "dtype": "float32", "experts": [
        _expert("a", "def import numpy", residual_scale=0.5), _expert("b", "once upon a")],
        "shared_experts": [_expert("base", "hello", residual_scale=2.0)]},
    "qwen_shared_random": {"base_model": "base", "gate_mode": "random", "dtype": "float32", "architecture": "qwen",
                           "experts": [_expert("a"), _expert("b")], "shared_experts": [_expert("base")]},
    # DeepSeek MoE: a shared expert without prompts is always on (mergekit draws its random row anyway).
    "deepseek_shared": {"base_model": "base", "gate_mode": "random", "dtype": "float32",
                        "experts": [_expert("a"), _expert("c")], "shared_experts": [_expert("c")]},
    "qwen3": {"base_model": "base", "gate_mode": "cheap_embed", "dtype": "float32", "experts": [
        _expert("a", "def import"), _expert("b", "once upon"), _expert("c", "the sum")]},
    # Qwen2 experts (q/k/v biases) with a gated shared expert; with a random gate and no prompts mergekit
    # still gates it, since DeepSeek MoE takes only Llama and Mistral.
    "qwen2_shared": {"base_model": "base", "gate_mode": "hidden", "dtype": "float32", "experts": [
        _expert("a", "def import numpy"), _expert("b", "once upon a")],
        "shared_experts": [_expert("b", "hello french")]},
    "qwen2_shared_random": {"base_model": "base", "gate_mode": "random", "dtype": "float32",
                            "experts": [_expert("a"), _expert("b"), _expert("c")], "shared_experts": [_expert("a")]},
}
FAMILY = {"qwen3": "qwen3", "qwen2_shared": "qwen2", "qwen2_shared_random": "qwen2"}
EXACT_GATES = ("cheap_embed", "random", "uniform_random")


def _absolute(config: dict, root: Path) -> dict:
    fix = lambda m: str(root / m)
    out = {**config, "base_model": fix(config["base_model"])}
    for key in ("experts", "shared_experts"):
        if key in config:
            out[key] = [{**e, "source_model": fix(e["source_model"])} for e in config[key]]
    return out


def run_mergekit_moe(cfg: Path, out: Path) -> None:
    """mergekit-moe's own command (its click entry point, in this process), seeded, on CPU."""
    from mergekit.scripts.moe import main as mergekit_moe

    mergekit_moe.main([str(cfg), str(out), "--random-seed", "0", "--no-copy-tokenizer"], standalone_mode=False)


@pytest.fixture(scope="session")
def built(zoo, tmp_path_factory):
    """name -> (compose's output, mergekit's output), each built once."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in made:
            root = tmp_path_factory.mktemp(f"moe_{name}")
            cfg = root / "moe.yml"
            cfg.write_text(yaml.safe_dump(_absolute(CONFIGS[name], zoo / FAMILY.get(name, "llama"))))
            run_mergekit_moe(cfg, root / "mergekit")
            assert main(["build", str(cfg), "-o", str(root / "compose")]) == 0
            made[name] = (root / "compose", root / "mergekit")
        return made[name]

    return get


def as_compose_names(tensors: dict, model_type: str) -> dict:
    """mergekit's tensors under compose's per-expert names: a fused `experts.gate_up_proj` (E, 2I, H) is
    each expert's gate rows then its up rows, `experts.down_proj` (E, H, I) each expert's down; Mixtral's
    experts and router live under `block_sparse_moe` (w1 gate, w2 down, w3 up); DeepSeek's shared expert
    is `shared_experts`."""
    mixtral = model_type == "mixtral"
    out = {}
    for k, v in tensors.items():
        m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", k)
        if m:
            layer, what = m.groups()
            for e in range(v.shape[0]):
                p = f"{layer}.block_sparse_moe.experts.{e}." if mixtral else f"{layer}.mlp.experts.{e}."
                if what == "down_proj":
                    out[p + ("w2.weight" if mixtral else "down_proj.weight")] = v[e]
                else:
                    gate, up = v[e].chunk(2, dim=0)
                    out[p + ("w1.weight" if mixtral else "gate_proj.weight")] = gate
                    out[p + ("w3.weight" if mixtral else "up_proj.weight")] = up
        elif mixtral and k.endswith(".mlp.gate.weight"):
            out[k.replace(".mlp.", ".block_sparse_moe.")] = v
        else:
            out[k.replace(".mlp.shared_experts.", ".mlp.shared_expert.")] = v
    return out


def _is_router(name: str) -> bool:
    return name.endswith(("block_sparse_moe.gate.weight", "mlp.gate.weight", "shared_expert_gate.weight"))


@peer
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_tensors_as_mergekit_moe(built, name):
    ours, theirs = built(name)
    kind = json.loads((theirs / "config.json").read_text())["model_type"]
    a, b = read_tensors(ours), as_compose_names(read_tensors(theirs), kind)
    if kind == "qwen2_moe" and FAMILY.get(name) != "qwen2":
        # mergekit's Qwen MoE gives a Llama base zero q/k/v biases; compose writes qkv_bias: false instead.
        for k in [k for k in b if k.endswith("_proj.bias")]:
            assert not b.pop(k).any(), k
    if kind == "deepseek":
        # compose writes DeepSeek's always-on shared expert as Qwen2-MoE's: behind a zero gate (sigmoid 1/2)
        # with its down projection doubled, exact in floating point (families/qwen2_moe.py).
        for k in [k for k in a if k.endswith("shared_expert_gate.weight")]:
            assert not a.pop(k).any(), k
        for k in [k for k in a if ".shared_expert.down_proj" in k]:
            a[k] = a[k] / 2
        assert json.loads((ours / "config.json").read_text())["model_type"] == "qwen2_moe"
    assert sorted(a) == sorted(b)
    gate = CONFIGS[name]["gate_mode"]
    for k in sorted(b):
        assert a[k].dtype == b[k].dtype == torch.float32 and a[k].shape == b[k].shape, k
        if not _is_router(k) or gate in ("random", "uniform_random"):
            assert torch.equal(a[k], b[k]), k
        elif gate == "cheap_embed":  # float32 sums of the same rows, perhaps in another order
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        else:  # mergekit's bfloat16 forward (see the module docstring)
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1.5e-2, msg=lambda m, k=k: f"{k}: {m}")
    routers = [k for k in b if _is_router(k)]
    assert routers and all(a[k].any() for k in routers)


@peer
def test_outputs_load_in_transformers_as_the_same_model(built):
    """The fused and per-expert layouts are one model to transformers' own loader; compose writes per-expert
    keys (what llama.cpp's converter reads), mergekit transformers 5's fused ones."""
    from transformers import AutoModelForCausalLM

    for name in ("random", "qwen3"):
        ours, theirs = built(name)
        assert not any(k.endswith("gate_up_proj") for k in read_tensors(ours))
        assert any(k.endswith("experts.gate_up_proj") for k in read_tensors(theirs))
        a, b = (AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).state_dict() for p in (ours, theirs))
        assert sorted(a) == sorted(b)
        for k in b:
            assert torch.equal(a[k], b[k]), k


@peer
@pytest.mark.parametrize("name", ["hidden", "hidden_avg", "qwen_shared"])
def test_hidden_gates_equal_mergekits_in_float32(built, zoo, tmp_path, monkeypatch, name):
    """mergekit's own gate code with its base model loaded in float32 instead of bfloat16: the rows then
    agree to float32 rounding, so the only difference left in the peer test is mergekit's dtype."""
    from mergekit.moe import router
    from transformers import AutoModelForCausalLM

    class Float32:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            return AutoModelForCausalLM.from_pretrained(*args, **{**kwargs, "torch_dtype": torch.float32})

    monkeypatch.setattr(router, "AutoModelForCausalLM", Float32)
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(_absolute(CONFIGS[name], zoo / "llama")))
    run_mergekit_moe(cfg, tmp_path / "mergekit")
    ours, _ = built(name)
    kind = json.loads((tmp_path / "mergekit" / "config.json").read_text())["model_type"]
    a, b = read_tensors(ours), as_compose_names(read_tensors(tmp_path / "mergekit"), kind)
    routers = [k for k in b if _is_router(k)]
    assert len(routers) == 3 * (2 if CONFIGS[name].get("shared_experts") else 1)
    for k in routers:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@peer
def test_noise_and_residual_scale_statistics(zoo, tmp_path):
    """noise_scale adds N(0, s^2) to an expert's gate, up and down weights, then residual_scale multiplies
    its down projection, in both tools; the other experts stay exact copies. (mergekit's numbers come
    from torch's global generator in its write order, so only the distribution can be compared.)"""
    from safetensors.torch import load_file

    s, r = 0.02, 0.5
    config = {"base_model": "base", "gate_mode": "random", "dtype": "float32",
              "experts": [_expert("a", noise_scale=s, residual_scale=r), _expert("b")]}
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(_absolute(config, zoo / "llama")))
    run_mergekit_moe(cfg, tmp_path / "mergekit")
    assert main(["build", str(cfg), "-o", str(tmp_path / "compose")]) == 0
    clean = {k: load_file(zoo / "llama" / m / "model.safetensors") for k, m in (("a", "a"), ("b", "b"))}
    results = {}
    for tool in ("compose", "mergekit"):
        t = as_compose_names(read_tensors(tmp_path / tool), "mixtral")
        deltas = []
        for i in range(3):
            p = f"model.layers.{i}.block_sparse_moe.experts."
            for w, src in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                want = clean["a"][f"model.layers.{i}.mlp.{src}.weight"]
                got = t[f"{p}0.{w}.weight"] / (r if w == "w2" else 1.0)
                deltas.append((got - want).flatten())
                assert torch.equal(t[f"{p}1.{w}.weight"], clean["b"][f"model.layers.{i}.mlp.{src}.weight"])
        d = torch.cat(deltas)
        assert abs(d.std().item() - s) < 0.03 * s, tool  # 18k draws: the sample std is within 0.5% (1 sigma)
        assert abs(d.mean().item()) < 5 * s / d.numel() ** 0.5, tool
        results[tool] = d
    assert not torch.equal(results["compose"], results["mergekit"])  # the same law, not the same numbers


@peer
def test_mergekit_moe_command_line(built, zoo, tmp_path):
    """The whole commands, as users run them, on one file: `mergekit-moe` and `compose build`."""
    cfg = tmp_path / "moe.yml"
    cfg.write_text(yaml.safe_dump(_absolute(CONFIGS["uniform_random"], zoo / "llama")))
    exe = Path(sys.executable).parent / "mergekit-moe"
    subprocess.run([str(exe), str(cfg), str(tmp_path / "mergekit"), "--random-seed", "0", "--no-copy-tokenizer"],
                   check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "compose", "build", str(cfg), "-o", str(tmp_path / "compose")],
                   check=True, capture_output=True, timeout=300)
    a, b = read_tensors(tmp_path / "compose"), as_compose_names(read_tensors(tmp_path / "mergekit"), "mixtral")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert read_tensors(built("uniform_random")[0]).keys() == a.keys()


# -- refused by name (no mergekit needed) -----------------------------------------------------------------

BASE = {"base_model": "tiny:llama?layers=2", "gate_mode": "hidden",
        "experts": [{"source_model": "tiny:llama?layers=2&seed=1", "positive_prompts": ["def f(x):"]},
                    {"source_model": "tiny:llama?layers=2&seed=2", "positive_prompts": ["Once upon"]}]}


def _refused(tmp_path, config: dict) -> str:
    p = tmp_path / "moe.yml"
    p.write_text(yaml.safe_dump(config))
    with pytest.raises(SpecError) as e:
        load_spec(p)
    return str(e.value)


@pytest.mark.parametrize("change,named", [
    ({"moe_method": "x"}, "moe_method: not a mergekit-moe config key"),
    ({"tokenizer_source": "base"}, "tokenizer_source: not a mergekit-moe config key"),
    ({"gate_mode": "learned"}, "gate_mode: 'learned' is not one of"),
    ({"experts_per_token": 3}, "experts_per_token: 3 is more than the 2 experts"),
    ({"dtype": "int8"}, "dtype: unsupported dtype 'int8'"),
    ({"architecture": "deepseek"}, "architecture: compose does not write DeepseekForCausalLM"),
    ({"architecture": "gpt"}, "architecture: 'gpt' names none of mergekit-moe's outputs"),
    ({"architecture": "mixtral", "shared_experts": [{"source_model": "tiny:llama?layers=2",
                                                     "positive_prompts": ["hi"]}]},
     "architecture: 'mixtral' cannot hold this config"),
    ({"shared_experts": [{"source_model": "tiny:llama?layers=2"}] * 2}, "shared_experts: 2 shared experts"),
])
def test_config_errors_name_the_key(tmp_path, change, named):
    assert named in _refused(tmp_path, {**BASE, **change})


def test_expert_keys_and_prompts_are_checked(tmp_path):
    experts = [dict(BASE["experts"][0], prompt="x"), BASE["experts"][1]]
    assert "experts[0].prompt: not a mergekit-moe expert key" in _refused(tmp_path, {**BASE, "experts": experts})
    experts = [BASE["experts"][0], {"source_model": "tiny:llama?layers=2&seed=2"}]
    msg = _refused(tmp_path, {**BASE, "experts": experts})
    assert "experts[1].positive_prompts: gate_mode hidden needs at least one prompt" in msg
    experts = [BASE["experts"][0], dict(BASE["experts"][1], noise_scale=-1)]
    assert "experts[1].noise_scale: must be at least 0" in _refused(tmp_path, {**BASE, "experts": experts})
    assert "experts: expected a non-empty list of experts" in _refused(tmp_path, {**BASE, "experts": "a"})


def test_wrong_number_of_prompt_lists_is_refused(tmp_path):
    """In compose's own spec form, a gated shared expert needs one prompt list more than the experts."""
    spec = {"model": {"op": "moe", "kind": "from_experts", "model": {"op": "load", "ref": "tiny:llama?layers=2"},
                      "experts": [{"op": "load", "ref": f"tiny:llama?layers=2&seed={i}"} for i in (1, 2)],
                      "shared_expert": {"op": "load", "ref": "tiny:llama?layers=2"}, "shared_gate": True,
                      "router": {"init": "hidden", "prompts": [["def"], ["Once"]]}}}
    (tmp_path / "spec.yml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"model\.router\.prompts: 2 prompt lists for 3 experts"):
        main_build(tmp_path / "spec.yml", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def main_build(spec: Path, out: Path) -> None:
    from compose.pipeline import build

    build(spec, out, progress=False)


def test_example_spec_builds(tmp_path):
    """specs/mergekit_moe.yml, on the built-in tiny models: a Mixtral whose routers are unit rows, one expert
    scaled, one noised, the others copies of their models' FFNs."""
    from transformers import AutoModelForCausalLM

    from compose.sources import open_source

    out = tmp_path / "out"
    assert main(["build", str(ROOT / "specs" / "mergekit_moe.yml"), "-o", str(out)]) == 0
    t = read_tensors(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    gate = t["model.layers.0.block_sparse_moe.gate.weight"]
    torch.testing.assert_close(gate.norm(dim=-1), torch.ones(4))
    src = {i: open_source(f"tiny:llama?seed={i}") for i in (1, 3, 4)}
    w = lambda i, n: src[i].tensor(f"model.layers.0.mlp.{n}.weight")
    assert torch.equal(t["model.layers.0.block_sparse_moe.experts.0.w1.weight"], w(1, "gate_proj"))
    assert torch.equal(t["model.layers.0.block_sparse_moe.experts.2.w2.weight"], w(3, "down_proj") * 0.5)
    noised = t["model.layers.0.block_sparse_moe.experts.3.w1.weight"] - w(4, "gate_proj")
    assert 0.008 < noised.std().item() < 0.012
    AutoModelForCausalLM.from_pretrained(str(out))


def test_yaml_is_the_dsl_spec(tmp_path):
    """A mergekit-moe YAML reads into the spec compose's own DSL writes for it (so `compose inspect` and
    compose.json show it in compose's terms)."""
    from compose import load, moe
    from compose.spec import BuildSpec

    config = {"base_model": "tiny:llama?layers=2", "gate_mode": "uniform_random", "experts_per_token": 1,
              "experts": [{"source_model": "tiny:llama?layers=2&seed=1", "noise_scale": 0.01},
                          {"source_model": "tiny:llama?layers=2&seed=2", "residual_scale": 0.5}],
              "shared_experts": [{"source_model": "tiny:llama?layers=2&seed=3", "positive_prompts": ["hi"]}]}
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config))
    dsl = moe.from_experts(base=load("tiny:llama?layers=2"), experts=[load(f"tiny:llama?layers=2&seed={i}")
                                                                       for i in (1, 2)],
                           top_k=1, router=moe.uniform_random(0, draw="whole"),
                           shared_expert=load("tiny:llama?layers=2&seed=3"), shared_gate=True,
                           expert_noise=[0.01, 0.0, 0.0], residual_scale=[1.0, 0.5, 1.0])
    assert load_spec(tmp_path / "moe.yml") == BuildSpec(model=dsl)
