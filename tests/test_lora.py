"""LoRA: `load("model+adapter")` folds a PEFT adapter in as PEFT's own merge_and_unload does, mergekit
configs take `model+lora` as mergekit does, `compose extract-lora` writes the adapter
mergekit-extract-lora writes, and PEFT on a LLaMA-Pro build needs o_proj/down_proj in its targets.

Every reference is the consumer's own code: adapters are made and merged by PEFT, configs merged and
adapters extracted by mergekit 0.1.5 (`peer` tests), models run by transformers."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_hf, logits, read_tensors, save_hf_model, token_ids

import compose
from compose.cli import main
from compose.errors import ComposeError

peft = pytest.importorskip("peft")

LAYERS = 2


def make_adapter(base: Path, out: Path, seed: int = 0, **lora) -> Path:
    """An adapter made by PEFT itself on `base`, with random non-zero A and B (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_hf(base), LoraConfig(init_lora_weights=False, **lora))
    model.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(base), adapter).merge_and_unload().eval()


ADAPTERS = {
    # The plain case: r=4 on some projections, scale alpha/r = 2.
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    # rsLoRA's alpha/sqrt(r), and per-module ranks and alphas.
    "rslora_patterns": dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 3},
                            alpha_pattern={"down_proj": 3.0},
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]),
    # LoRA on the embeddings (PEFT also saves the embedding as base_layer) and a head in modules_to_save.
    "embed_saved": dict(r=4, lora_alpha=4, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"]),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = save_hf_model(root / "base", "llama", seed=0, layers=LAYERS)
    adapters = {name: make_adapter(base, root / name, seed=i, **kw) for i, (name, kw) in enumerate(ADAPTERS.items())}
    return root, base, adapters


def _build(spec, out: Path) -> Path:
    return compose.build(spec, out, progress=False)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_fold_matches_peft_merge_and_unload(zoo, name):
    root, base, adapters = zoo
    out = _build(compose.load(f"{base}+{adapters[name]}"), root / f"out_{name}")
    ref = peft_merged(base, adapters[name])
    want = ref.state_dict()
    got = read_tensors(out)
    plain = read_tensors(base)
    assert set(got) == set(want)
    changed = [k for k in want if not torch.equal(want[k], plain[k])]
    assert changed  # the adapter does something, so equality below means the fold computed it
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    ids = token_ids()
    torch.testing.assert_close(logits(load_hf(out), ids), logits(ref, ids), rtol=0, atol=1e-5)


def test_lora_keyword_and_dump(zoo):
    _, base, adapters = zoo
    ad = adapters["plain"]
    assert compose.load(str(base), lora=str(ad)) == compose.load(f"{base}+{ad}")
    from compose.ir import print_graph

    from compose.pipeline import compile_graph

    dump = print_graph(compile_graph(compose.load(str(base), lora=str(ad))))
    # The dump says which weights are folded, with which factors and scale; the rest load as they were.
    assert "self_attn.q_proj.weight <- lora(" in dump and "scale=2.0" in dump
    assert "k_proj.weight <- lora(" not in dump
    with pytest.raises(ComposeError, match="already names an adapter"):
        compose.load(f"{base}+{ad}", lora=str(ad))


def test_folded_model_composes(zoo):
    """`base+adapter` is a load like any other: a LLaMA-Pro expansion of it computes PEFT's merged model."""
    root, base, adapters = zoo
    out = _build(compose.expand_blocks(compose.load(f"{base}+{adapters['plain']}"), groups=LAYERS), root / "pro")
    ids = token_ids()
    ref = peft_merged(base, adapters["plain"])
    assert load_hf(out).config.num_hidden_layers == 2 * LAYERS
    torch.testing.assert_close(logits(load_hf(out), ids), logits(ref, ids), rtol=0, atol=1e-5)


def test_peft_forward_unmerged_agrees(zoo):
    """The fold is the function PEFT computes while training (base plus the adapter's path), not only
    what its merge writes."""
    from peft import PeftModel

    root, base, adapters = zoo
    out = root / "out_embed_saved"
    if not out.exists():
        _build(compose.load(f"{base}+{adapters['embed_saved']}"), out)
    live = PeftModel.from_pretrained(load_hf(base), adapters["embed_saved"]).eval()
    ids = token_ids()
    torch.testing.assert_close(logits(load_hf(out), ids), logits(live, ids), rtol=0, atol=1e-5)


def test_fold_of_trained_biases_matches_peft(tmp_path):
    """bias: lora_only (PEFT trains the biases of the layers it adapts and saves them whole as
    `base_layer.bias`): the fold replaces those biases, as PEFT's merge does."""
    from peft import LoraConfig, get_peft_model

    base = save_hf_model(tmp_path / "base", "qwen2", seed=0, layers=LAYERS, perturb_all=True)
    torch.manual_seed(1)
    model = get_peft_model(load_hf(base), LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, bias="lora_only",
                                                     target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("q_proj.base_layer.bias"):
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "ad")
    ad = tmp_path / "ad"
    assert any(k.endswith("q_proj.base_layer.bias") for k in _adapter_tensors(ad))
    out = _build(compose.load(f"{base}+{ad}"), tmp_path / "out")
    want, got, plain = peft_merged(base, ad).state_dict(), read_tensors(out), read_tensors(base)
    q = "model.layers.0.self_attn.q_proj.bias"
    assert not torch.equal(want[q], plain[q])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7, msg=k)
    # The same tensor under bias: none, or the bias of a layer without a LoRA, is refused by name.
    none = _copy(ad, tmp_path / "none")
    _edit_config(none, bias="none")
    _refused(base, none, tmp_path / "o1", "is a trained bias, but adapter_config.json says bias 'none'")
    from safetensors.torch import load_file, save_file

    stray = _copy(ad, tmp_path / "stray")
    t = load_file(stray / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.k_proj.base_layer.bias"] = torch.zeros(32)
    save_file(t, stray / "adapter_model.safetensors")
    _refused(base, stray, tmp_path / "o2", "k_proj.base_layer.bias is the bias of a layer without a LoRA")


# -- hostile and unsupported adapters ----------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **fields) -> None:
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(fields)
    p.write_text(json.dumps(cfg))


def _refused(base: Path, adapter: Path, out: Path, match: str) -> None:
    with pytest.raises(ComposeError, match=match):
        _build(compose.load(f"{base}+{adapter}"), out)
    assert not out.exists()


def test_dora_refused_by_name(zoo):
    root, base, _ = zoo
    dora = make_adapter(base, root / "dora", r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    _refused(base, dora, root / "o_dora", "use_dora: DoRA")


@pytest.mark.parametrize("fields, match", [
    (dict(rank_pattern={"q_proj": 8}), r"module model\.layers\.0\.self_attn\.q_proj has A \[4, 64\].*r=8"),
    (dict(lora_alpha=float("inf")), "lora_alpha must be a finite number"),
    (dict(peft_type="IA3"), "peft_type 'IA3'"),
    (dict(lora_bias=True), "lora_bias: LoRA biases"),
    (dict(layer_replication=[[0, 2]]), "layer_replication"),
    (dict(bias="all"), "bias 'all'"),
    (dict(some_future_field={"x": 1}), "some_future_field: a field compose does not know"),
    (dict(rank_pattern={"(": 2}), r"rank_pattern\['\('\] is not a valid pattern"),
])
def test_bad_adapter_config(zoo, tmp_path, fields, match):
    _, base, adapters = zoo
    bad = _copy(adapters["plain"], tmp_path / "ad")
    _edit_config(bad, **fields)
    _refused(base, bad, tmp_path / "out", match)


def test_adapter_for_another_model(zoo, tmp_path):
    _, base, _ = zoo
    deeper = save_hf_model(tmp_path / "deeper", "llama", seed=0, layers=LAYERS + 1)
    ad = make_adapter(deeper, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])
    _refused(base, ad, tmp_path / "out", rf"adapts model\.layers\.{LAYERS}\.self_attn\.q_proj")
    wider = save_hf_model(tmp_path / "wider", "llama", seed=0, layers=LAYERS, hidden=32)
    ad2 = make_adapter(wider, tmp_path / "ad2", r=4, lora_alpha=8, target_modules=["v_proj"])
    _refused(base, ad2, tmp_path / "out", r"must be A \[4, 64\] and B \[32, 4\]")


def test_adapter_weights_outside_folder_and_pickles(zoo, tmp_path):
    _, base, adapters = zoo
    linked = _copy(adapters["plain"], tmp_path / "linked")
    outside = tmp_path / "elsewhere.safetensors"
    (linked / "adapter_model.safetensors").rename(outside)
    (linked / "adapter_model.safetensors").symlink_to(outside)
    _refused(base, linked, tmp_path / "out", "outside the adapter folder")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(adapters["plain"] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not read")
    _refused(base, pickled, tmp_path / "out", "only pickled adapter_model.bin")
    truncated = _copy(adapters["plain"], tmp_path / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[:-4])
    _refused(base, truncated, tmp_path / "out", "not a valid safetensors file")


def test_nonfinite_adapter_and_overflowing_scale(zoo, tmp_path):
    from safetensors.torch import load_file, save_file

    _, base, adapters = zoo
    nan = _copy(adapters["plain"], tmp_path / "nan")
    t = load_file(nan / "adapter_model.safetensors")
    key = next(k for k in sorted(t) if k.endswith("q_proj.lora_B.weight"))
    t[key][0, 0] = float("nan")
    save_file(t, nan / "adapter_model.safetensors")
    _refused(base, nan, tmp_path / "out", f"tensor {key} holds NaN or Inf")
    huge = _copy(adapters["plain"], tmp_path / "huge")
    _edit_config(huge, lora_alpha=1e300)
    _refused(base, huge, tmp_path / "out", r"lora\(.*produced NaN or Inf from finite inputs")


def test_bad_references(zoo, tmp_path):
    _, base, adapters = zoo
    with pytest.raises(ComposeError, match="is not `model\\+adapter`"):
        _build(compose.load(f"{base}+{adapters['plain']}+{adapters['plain']}"), tmp_path / "out")
    with pytest.raises(ComposeError, match="no adapter_config.json"):
        _build(compose.load(f"{base}+{base}"), tmp_path / "out")


def test_tied_model_refuses_embedding_changes(tmp_path):
    tied = save_hf_model(tmp_path / "tied", "llama", seed=0, layers=LAYERS, tie=True)
    ad = make_adapter(tied, tmp_path / "ad", r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"])
    _refused(tied, ad, tmp_path / "out", "tied to them")


# -- mergekit configs --------------------------------------------------------------------------------------

def test_mergekit_config_ref_forms():
    from compose.mergekit_config import translate

    cfg = {"merge_method": "linear", "models": [
        {"model": "a+b", "parameters": {"weight": 1.0}},
        {"model": {"model": {"path": "c"}, "lora": {"path": "d"}}, "parameters": {"weight": 1.0}}]}
    refs = [m["model"]["ref"] for m in translate(cfg, "x.yml")["models"]]
    assert refs == ["a+b", "c+d"]
    with pytest.raises(ComposeError, match="is not `model` or `model\\+lora`"):
        translate({"merge_method": "linear", "models": [{"model": "a+b+c"}]}, "x.yml")


@pytest.mark.peer
def test_mergekit_yaml_with_lora_matches_mergekit(zoo, tmp_path):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    _, base, adapters = zoo
    other = save_hf_model(tmp_path / "other", "llama", seed=5, layers=LAYERS)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": f"{base}+{adapters['rslora_patterns']}", "parameters": {"weight": 0.7}},
                         {"model": str(other), "parameters": {"weight": 0.3}}]}
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                   lora_merge_cache=str(tmp_path / "cache")))
    spec = tmp_path / "merge.yml"
    spec.write_text(yaml.safe_dump(config))
    assert main(["build", str(spec), "-o", str(tmp_path / "ours"), "--no-progress"]) == 0
    want, got = read_tensors(tmp_path / "mk"), read_tensors(tmp_path / "ours")
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


# -- extract-lora ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base and a fine-tune of it (Qwen2: q/k/v have biases): every weight and bias nudged, the projections
    by a rank-8 change plus noise (so a rank-8 adapter captures most of it and a full-rank one all of it)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("extract")
    base = save_hf_model(root / "base", "qwen2", seed=0, layers=LAYERS, perturb_all=True)
    ft = root / "ft"
    shutil.copytree(base, ft)
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for k, v in load_file(base / "model.safetensors").items():
        d = 0.01 * torch.randn(v.shape, generator=g)
        if v.dim() == 2 and "proj" in k:
            d += torch.randn(v.shape[0], 8, generator=g) @ torch.randn(8, v.shape[1], generator=g) * 0.01
        tensors[k] = v + d
    save_file(tensors, ft / "model.safetensors", metadata={"format": "pt"})
    return root, base, ft


def _extract(base: Path, ft: Path, out: Path, rank: int, *flags: str) -> Path:
    assert main(["extract-lora", "--model", str(ft), "--base", str(base), "-o", str(out), "--rank", str(rank),
                 *flags]) == 0
    return out


def _mergekit_extract(base: Path, ft: Path, out: Path, rank: int, *flags: str) -> Path:
    pytest.importorskip("mergekit")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", str(ft), "--base-model",
                    str(base), "--out-path", str(out), "--max-rank", str(rank), *flags], check=True, env=env,
                   capture_output=True)
    return out


def _products(folder: Path, base: Path) -> dict[str, torch.Tensor]:
    """Module -> B @ A (individual factors may differ by a sign per singular vector; a LoRA embedding's
    product is the transposed delta), the full tensors, and each bias change: compose's `base_layer.bias`
    (the fine-tuned bias) less the base's, mergekit's `lora_B.bias` (the difference itself)."""
    t = _adapter_tensors(folder)
    plain = read_tensors(base)
    out = {}
    for k, v in t.items():
        name = k.removeprefix("base_model.model.")
        if ".lora_A." in k or ".lora_embedding_A" in k:
            out[name.split(".lora_")[0]] = t[k.replace("_A", "_B")] @ v
        elif name.endswith(".base_layer.bias"):
            module = name.removesuffix(".base_layer.bias")
            out[module + ".bias_delta"] = v - plain[module + ".bias"]
        elif name.endswith(".lora_B.bias"):
            out[name.removesuffix(".lora_B.bias") + ".bias_delta"] = v
        elif ".lora_B" not in k:
            out[name] = v
    return out


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _same_adapter(ours: Path, theirs: Path, base: Path) -> None:
    a, b = _products(ours, base), _products(theirs, base)
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    ca, cb = (json.loads((f / "adapter_config.json").read_text()) for f in (ours, theirs))
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out"):
        assert ca[field] == cb[field], field
    for field in ("rank_pattern", "alpha_pattern"):  # compose escapes the names (a dot matches only a dot)
        assert {re.sub(r"\\(.)", r"\1", k): v for k, v in ca[field].items()} == cb[field], field
    for field in ("target_modules", "modules_to_save"):
        assert sorted(ca[field]) == sorted(cb[field]), field


@pytest.mark.peer
def test_extract_matches_mergekit_extract_lora(pair, tmp_path):
    from peft import PeftModel

    _, base, ft = pair
    ours = _extract(base, ft, tmp_path / "ours", 8)
    theirs = _mergekit_extract(base, ft, tmp_path / "mk", 8)
    _same_adapter(ours, theirs, base)
    # PEFT loads both and computes the same weights; the biases are where the two differ: PEFT drops
    # mergekit's lora_B.bias (its config has no lora_bias) and reads compose's bias: lora_only.
    mine = PeftModel.from_pretrained(load_hf(base), ours).merge_and_unload().eval().state_dict()
    ref = PeftModel.from_pretrained(load_hf(base), theirs).merge_and_unload().eval().state_dict()
    want, plain = read_tensors(ft), read_tensors(base)
    biases = [k for k in want if k.endswith(".bias")]
    assert biases and all(not torch.equal(want[k], plain[k]) for k in biases)
    for k in want:
        if k.endswith(".bias"):
            torch.testing.assert_close(mine[k], want[k], rtol=0, atol=0, msg=k)
            torch.testing.assert_close(ref[k], plain[k], rtol=0, atol=0, msg=k)
        else:
            torch.testing.assert_close(mine[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.peer
@pytest.mark.parametrize("flags", [
    # ranks from the values (8 for the projections' rank-8 change, capped at 16 for the noise of the vocabulary
    # tensors), LoRA on the embedding (transposed) and head, all the scale in A, a module saved whole by its
    # last name, another left out, no norms. (mergekit 0.1.5 crashes on --save-module unless nothing else
    # is added to modules_to_save: its click tuple has no append, so this run skips the norms.)
    ("--sv-epsilon", "0.2", "--embed-lora", "--no-distribute-scale", "--save-module", "o_proj",
     "-e", r"layers\.1\.mlp\.down", "--skip-undecomposable"),
    # only the attention (the norms are not included; the vocabulary tensors are saved whole all the same)
    ("-i", "self_attn"),
], ids=["epsilon_embed_scale_save_exclude_skip", "include"])
def test_extract_options_match_mergekit(pair, tmp_path, flags):
    _, base, ft = pair
    ours = _extract(base, ft, tmp_path / "ours", 16, *flags)
    theirs = _mergekit_extract(base, ft, tmp_path / "mk", 16, *flags)
    _same_adapter(ours, theirs, base)
    # The factors themselves, not only their products (which do not show where the scale went): equal up
    # to the sign of each singular vector.
    a, b = _adapter_tensors(ours), _adapter_tensors(theirs)
    for k in (k for k in b if "lora_" in k and not k.endswith(".bias")):
        torch.testing.assert_close(a[k].abs(), b[k].abs(), rtol=1e-3, atol=1e-5, msg=k)
    # PEFT loads both (the embedding's LoRA included) to the same weights
    from peft import PeftModel

    mine = PeftModel.from_pretrained(load_hf(base), ours).merge_and_unload().state_dict()
    ref = PeftModel.from_pretrained(load_hf(base), theirs).merge_and_unload().state_dict()
    plain = read_tensors(base)
    assert not torch.equal(mine["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])
    for k in (k for k in plain if not k.endswith(".bias")):
        torch.testing.assert_close(mine[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    cfg = json.loads((ours / "adapter_config.json").read_text())
    if "--embed-lora" in flags:
        assert {"embed_tokens", "lm_head"} <= set(cfg["target_modules"]) and cfg["r"] == 16
        assert set(cfg["rank_pattern"].values()) == {8}
        assert cfg["modules_to_save"] == ["o_proj"] and not any("layers.1.mlp.down" in k or "norm" in k for k in a)
    else:
        assert set(cfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert cfg["modules_to_save"] == ["embed_tokens", "lm_head"]
        assert not any("norm" in k or "mlp" in k for k in a)


def test_extract_epsilon_above_every_singular_value_is_no_change(pair, tmp_path):
    """A module whose every singular value is cut (rank 0, which PEFT cannot hold) comes out as a rank-1 pair of
    zeros: PEFT loads it and the merged module is the base's."""
    from peft import PeftModel

    _, base, ft = pair
    ad = _extract(base, ft, tmp_path / "ad", 4, "--sv-epsilon", "1e9", "-i", r"layers\.0\.self_attn\.q_proj$")
    t = _adapter_tensors(ad)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert t[f"{q}.lora_A.weight"].shape == (1, 64) and not t[f"{q}.lora_A.weight"].any()
    merged = PeftModel.from_pretrained(load_hf(base), ad).merge_and_unload().state_dict()
    plain, want = read_tensors(base), read_tensors(ft)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(merged[w], plain[w])
    # ...while the bias of the adapted layer changed, and the vocabulary tensors were saved whole
    for k in ("model.layers.0.self_attn.q_proj.bias", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(merged[k], want[k]), k


def test_full_rank_extraction_reproduces_the_fine_tune(pair, tmp_path):
    """At full rank the adapter is the whole difference: PEFT's merged model and compose's own fold of it
    both give the fine-tuned model's logits. k/v (32 rows here) come out at rank 32 < r = 64: rank_pattern."""
    from peft import PeftModel

    _, base, ft = pair
    ad = _extract(base, ft, tmp_path / "full", 64)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["r"] == 64 and cfg["rank_pattern"] and set(cfg["rank_pattern"].values()) == {32}
    ids = token_ids()
    want = logits(load_hf(ft), ids)
    merged = PeftModel.from_pretrained(load_hf(base), ad).merge_and_unload().eval()
    torch.testing.assert_close(logits(merged, ids), want, rtol=0, atol=1e-4)
    out = _build(compose.load(f"{base}+{ad}"), tmp_path / "folded")
    torch.testing.assert_close(logits(load_hf(out), ids), want, rtol=0, atol=1e-4)
    # ...and a low rank is an approximation, not the fine-tune (so the check above can fail).
    low = _extract(base, ft, tmp_path / "low", 1)
    approx = PeftModel.from_pretrained(load_hf(base), low).merge_and_unload().eval()
    assert (logits(approx, ids) - want).abs().max() > 1e-3


def test_extract_refuses(pair, tmp_path):
    _, base, ft = pair
    for flags in (["--rank", "0"], ["--rank", "4", "--sv-epsilon", "nan"], ["--rank", "4", "--sv-epsilon", "-1"],
                  ["--rank", "4", "-e", "("], ["--rank", "4", "-i", "no_such_module"]):
        assert main(["extract-lora", "--model", str(ft), "--base", str(base), "-o", str(tmp_path / "o"), *flags]) == 2
    from compose.extract_lora import Options, extract

    for options, match in ((Options(4, sv_epsilon=float("inf")), "--sv-epsilon: must be a finite number"),
                           (Options(4, exclude=("[",)), "--exclude-regex: '\\[' is not a valid"),
                           (Options(4, exclude=("proj",)), "no linear layer is left to decompose")):
        with pytest.raises(ComposeError, match=match):
            extract(str(ft), str(base), tmp_path / "o", options)
    other = save_hf_model(tmp_path / "deeper", "llama", seed=0, layers=LAYERS + 1)
    with pytest.raises(ComposeError, match="only in the fine-tuned model"):
        extract(str(other), str(base), tmp_path / "o", 4)
    assert not (tmp_path / "o").exists()
    # An output inside a source, or one that holds it (with --force it would be deleted), is refused.
    before = sorted(p.name for p in base.iterdir())
    with pytest.raises(ComposeError, match="lies inside the source folder"):
        extract(str(ft), str(base), base / "adapter", 4)
    with pytest.raises(ComposeError, match="holds the source folder"):
        extract(str(ft), str(base), base.parent, 4, force=True)
    assert sorted(p.name for p in base.iterdir()) == before


# -- LoRA on a LLaMA-Pro build -----------------------------------------------------------------------------

def test_llama_pro_needs_o_proj_in_lora_targets(tmp_path):
    """A LLaMA-Pro block starts with o_proj and down_proj zero. If those stay zero and frozen, nothing
    the block's attention or MLP computes reaches the residual stream, so LoRA on its q/v gets exactly zero
    gradient; with o_proj targeted too, its LoRA B gets a gradient at once."""
    from peft import LoraConfig, get_peft_model

    out = _build(Path(__file__).parent.parent / "specs" / "llama_pro.py", tmp_path / "pro")
    record = json.loads((out / "compose.json").read_text())
    new = sorted({int(n.split(".")[2]) for n in record["trainable"] if n.startswith("model.layers.")})
    assert new and len(new) < load_hf(out).config.num_hidden_layers
    ids = token_ids(seq=16)

    def grads(targets):
        torch.manual_seed(0)
        model = get_peft_model(load_hf(out), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        model(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}

    def layer(n: str) -> int:
        return int(n.split("layers.")[1].split(".")[0])

    qv = grads(["q_proj", "v_proj"])
    assert all(torch.count_nonzero(g) == 0 for n, g in qv.items() if layer(n) in new)
    assert any(torch.count_nonzero(g) > 0 for n, g in qv.items() if layer(n) not in new and "lora_B" in n)
    qvo = grads(["q_proj", "v_proj", "o_proj"])
    assert all(torch.count_nonzero(g) > 0 for n, g in qvo.items() if layer(n) in new and "o_proj.lora_B" in n)
