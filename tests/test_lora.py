"""LoRA: `load("model+adapter")` folds a PEFT adapter in as PEFT's own merge_and_unload does, mergekit
configs take `model+lora` as mergekit does, `compose extract-lora` writes the adapter
mergekit-extract-lora writes, and PEFT on a LLaMA-Pro build needs o_proj/down_proj in its targets.

Every reference is the consumer's own code: adapters are made and merged by PEFT, configs merged and
adapters extracted by mergekit 0.1.5 (`peer` tests), models run by transformers."""
from __future__ import annotations

import json
import os
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
    """A base and a fine-tune of it: every weight nudged, the projections by a rank-8 change plus noise
    (so a rank-8 adapter captures most of it and a full-rank one all of it)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("extract")
    base = save_hf_model(root / "base", "llama", seed=0, layers=LAYERS)
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


def _extract(base: Path, ft: Path, out: Path, rank: int) -> Path:
    assert main(["extract-lora", "--model", str(ft), "--base", str(base), "-o", str(out), "--rank", str(rank)]) == 0
    return out


def _products(folder: Path) -> dict[str, torch.Tensor]:
    """Module -> B @ A (individual factors may differ by a sign per singular vector), and the full tensors."""
    t = read_tensors(folder) if (folder / "model.safetensors").exists() else _adapter_tensors(folder)
    out = {}
    for k, v in t.items():
        if ".lora_A." in k:
            out[k.replace(".lora_A.weight", "")] = t[k.replace("lora_A", "lora_B")] @ v
        elif ".lora_B." not in k:
            out[k] = v
    return out


def _adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.peer
def test_extract_matches_mergekit_extract_lora(pair, tmp_path):
    pytest.importorskip("mergekit")
    from peft import PeftModel

    _, base, ft = pair
    ours = _extract(base, ft, tmp_path / "ours", 8)
    theirs = tmp_path / "mk"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "mergekit.scripts.extract_lora", "--model", str(ft), "--base-model",
                    str(base), "--out-path", str(theirs), "--max-rank", "8"], check=True, env=env,
                   capture_output=True)
    a, b = _products(ours), _products(theirs)
    assert set(a) == set(b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    ca, cb = (json.loads((f / "adapter_config.json").read_text()) for f in (ours, theirs))
    for field in ("peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out"):
        assert ca[field] == cb[field], field
    for field in ("target_modules", "modules_to_save"):
        assert sorted(ca[field]) == sorted(cb[field]), field
    # PEFT loads both, and they compute the same model.
    ids = token_ids()
    mine = PeftModel.from_pretrained(load_hf(base), ours).merge_and_unload().eval()
    ref = PeftModel.from_pretrained(load_hf(base), theirs).merge_and_unload().eval()
    torch.testing.assert_close(logits(mine, ids), logits(ref, ids), rtol=0, atol=1e-5)


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
    assert main(["extract-lora", "--model", str(ft), "--base", str(base), "-o", str(tmp_path / "o"),
                 "--rank", "0"]) == 2
    other = save_hf_model(tmp_path / "deeper", "llama", seed=0, layers=LAYERS + 1)
    with pytest.raises(ComposeError, match="only in the fine-tuned model"):
        from compose.extract_lora import extract

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
