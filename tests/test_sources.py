"""Model sources: real local HF folders (sharded, tied), hub ids through the local cache, tiny models."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from compose import build, expand_blocks, load
from compose.errors import SourceError
from compose.sources import clear_cache, open_source
from conftest import load_hf, logits, read_tensors, save_hf_model, token_ids


def test_sharded_save_pretrained_folder_is_a_source(tmp_path):
    src = save_hf_model(tmp_path / "src", "llama", seed=4, shard="60KB")
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2 and (src / "model.safetensors.index.json").exists()
    out = build(expand_blocks(load(str(src)), groups=2), tmp_path / "out", progress=False)
    ids = token_ids()
    assert torch.equal(logits(load_hf(src), ids), logits(load_hf(out), ids))


def test_missing_shard_is_named(tmp_path):
    src = save_hf_model(tmp_path / "src", "llama", shard="60KB")
    victim = sorted(src.glob("*.safetensors"))[1]
    victim.unlink()
    clear_cache()
    with pytest.raises(SourceError, match=f"{victim}: shard listed in model.safetensors.index.json is missing"):
        open_source(str(src))


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    clear_cache()
    with pytest.raises(SourceError, match="only pickled weights"):
        open_source(str(tmp_path))


def test_a_checkpoint_that_is_not_its_model_types_is_named(tmp_path):
    """A Llama checkpoint that says it is GPT-2: GPT-2 is derived from transformers' class, whose tensors
    these are not (issue 25 changed this from "not supported")."""
    src = save_hf_model(tmp_path / "src", "llama", layers=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    clear_cache()
    with pytest.raises(SourceError, match="is not one transformers' GPT2LMHeadModel has"):
        open_source(str(src))


def test_hub_id_resolves_through_the_local_cache_offline(tmp_path):
    """A hub id found in the Hugging Face cache builds with the network forbidden (HF_HUB_OFFLINE=1)."""
    src = save_hf_model(tmp_path / "src", "qwen2", layers=2, tie=True)
    snap = tmp_path / "hub" / "models--acme--tiny-qwen" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    (tmp_path / "hub" / "models--acme--tiny-qwen" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-qwen" / "refs" / "main").write_text("0123abcd")
    (tmp_path / "spec.py").write_text("from compose import load, expand_blocks\n"
                                      "model = expand_blocks(load('acme/tiny-qwen'), groups=1)\n")
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    run = lambda spec, out: subprocess.run([sys.executable, "-m", "compose", "build", spec, "-o", out],
                                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    r = run("spec.py", "out")
    assert r.returncode == 0, r.stderr
    ids = token_ids()
    assert torch.equal(logits(load_hf(src), ids), logits(load_hf(tmp_path / "out"), ids))

    (tmp_path / "missing.py").write_text("from compose import load\nmodel = load('acme/not-cached')\n")
    r = run("missing.py", "out2")
    assert r.returncode == 2 and "acme/not-cached: not in the local Hugging Face cache" in r.stderr
    assert not (tmp_path / "out2").exists()


def test_tiny_models_are_deterministic_and_seeded():
    clear_cache()
    a = open_source("tiny:mistral?seed=5").tensor("model.layers.1.mlp.up_proj.weight")
    clear_cache()
    b = open_source("tiny:mistral?seed=5").tensor("model.layers.1.mlp.up_proj.weight")
    c = open_source("tiny:mistral?seed=6").tensor("model.layers.1.mlp.up_proj.weight")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert open_source("tiny:llama?layers=8").ref == "tiny:llama"
    with pytest.raises(SourceError, match="unknown option 'depth'"):
        open_source("tiny:llama?depth=3")


def test_tiny_model_loads_in_transformers_as_its_family(tmp_path):
    for family, cls in [("llama", "LlamaForCausalLM"), ("mistral", "MistralForCausalLM"),
                        ("qwen2", "Qwen2ForCausalLM")]:
        out = build(load(f"tiny:{family}?layers=2"), tmp_path / family, progress=False)
        model = load_hf(out)
        assert type(model).__name__ == cls
        assert set(read_tensors(out)) == {n for n, _ in model.named_parameters()} - (
            {"lm_head.weight"} if model.config.tie_word_embeddings else set())
