"""The files the Hugging Face Hub and transformers read beside the weights, read by their own code:
the model card `README.md` by huggingface_hub's `ModelCard.load`, `generation_config.json` by
transformers' `GenerationConfig.from_pretrained`; both recorded in compose.json, and `compose verify`
passing on the folder."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from transformers import AutoConfig, GenerationConfig

from compose import build, calm, depth_upscale, expand_blocks, load, merge, moe, visual_expert
from conftest import manifest, read_tensors, save_hf_model


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "compose", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub_sources")
    return {name: save_hf_model(root / name, "llama", seed=seed, layers=2) for name, seed in
            (("base-llama", 1), ("chat-llama", 2), ("code-llama", 3))}


@pytest.fixture(scope="module")
def builds(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hub_builds")
    a, b, c = (load(str(sources[n])) for n in ("base-llama", "chat-llama", "code-llama"))
    tiny = load("tiny:llama?layers=4")
    specs = {
        "llama_pro": expand_blocks(a, groups=2),
        "ties": merge.ties([b, c], base=a, weight=0.5, density=0.5),
        "solar": depth_upscale(tiny, drop=1),
        "upcycle": moe.upcycle(tiny, num_experts=4, top_k=2),
        "deepseek": moe.fine_grained(tiny, segments=2, routed=4, shared=1, top_k=2, preserve=True),
        "calm": calm(anchor=load("tiny:llama?layers=4&seed=1"), augment=load("tiny:llama?layers=2&seed=2"), every=2),
        "cogvlm": visual_expert(load("tiny:llama?layers=2"), vision_width=32),
        "tiny": load("tiny:qwen2?layers=2"),
    }
    return {name: build(spec, root / name, progress=False) for name, spec in specs.items()}


def card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


def spec_block(text: str) -> dict:
    m = re.search(r"^## Spec\n\n(`{3,})yaml\n(.*?)\n\1$", text, re.S | re.M)
    assert m, "no spec code block"
    return yaml.safe_load(m[2])


# -- README.md -----------------------------------------------------------------------------------------

def test_card_front_matter_names_the_sources_and_the_method(builds, sources):
    pro = card(builds["llama_pro"])
    assert pro.data.base_model == ["base-llama"]
    assert pro.data.library_name == "transformers"
    assert pro.data.tags[:2] == ["compose", "merge"] and "llama-pro" in pro.data.tags
    assert "https://arxiv.org/abs/2401.02415" in pro.text
    ties = card(builds["ties"])
    assert ties.data.base_model == ["chat-llama", "code-llama", "base-llama"]
    assert {"mergekit", "ties"} <= set(ties.data.tags)
    assert "https://arxiv.org/abs/2306.01708" in ties.text


@pytest.mark.parametrize("name, tag, paper", [
    ("solar", "solar", "2312.15166"), ("upcycle", "moe", "2401.04088"), ("deepseek", "moe", "2401.06066"),
    ("calm", "calm", "2401.02412"), ("cogvlm", "cogvlm", "2311.03079")])
def test_card_of_each_method(builds, name, tag, paper):
    c = card(builds[name])
    assert tag in c.data.tags and f"https://arxiv.org/abs/{paper}" in c.text
    # Built-in tiny models are no Hub models: not in base_model, and named as what they are in the body.
    assert c.data.base_model is None
    assert "built-in tiny model" in c.text


def test_card_spec_is_the_spec_compose_json_records(builds):
    for name, out in builds.items():
        assert spec_block((out / "README.md").read_text()) == manifest(out)["spec"], name


def test_card_trainable_set_is_what_trains(builds):
    """The count is the numel of the tensors compose.json lists as trainable, read from the checkpoint."""
    for name, out in builds.items():
        text = (out / "README.md").read_text()
        m = re.search(r"^## Trainable parameters\n\n([\d,]+) of ([\d,]+) parameters", text, re.M)
        tensors = read_tensors(out)
        trainable = sum(tensors[n].numel() for n in manifest(out)["trainable"])
        assert int(m[1].replace(",", "")) == trainable == manifest(out)["cost"]["trainable_params"], name
        assert int(m[2].replace(",", "")) == sum(t.numel() for t in tensors.values()), name
    pro = (builds["llama_pro"] / "README.md").read_text()
    assert "`model.layers.{1,3}.*`" in pro and "only the new blocks train" in pro
    assert "`cross." in (builds["calm"] / "README.md").read_text()


def test_card_is_the_same_wherever_the_build_goes(builds, tmp_path):
    again = build(load("tiny:qwen2?layers=2"), tmp_path / "elsewhere", progress=False)
    assert (again / "README.md").read_bytes() == (builds["tiny"] / "README.md").read_bytes()


def test_hub_id_source_is_base_model_as_it_is(tmp_path, sources):
    """A hub id, resolved from the local Hugging Face cache, goes into base_model as written."""
    snapshot = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(sources["base-llama"], snapshot)
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs" / "main").write_text("a" * 40)
    (tmp_path / "spec.yaml").write_text("model:\n  op: depth_upscale\n  drop: 1\n"
                                        "  model: {op: load, ref: acme/tiny-llama}\n")
    r = cli("build", "spec.yaml", "-o", "out", cwd=tmp_path,
            env={"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    c = card(tmp_path / "out")
    assert c.data.base_model == ["acme/tiny-llama"] and "solar" in c.data.tags


# -- generation_config.json ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["solar", "upcycle", "deepseek", "calm", "cogvlm", "tiny"])
def test_default_generation_config_is_transformers_own(builds, name):
    """Without one in the source, generation_config.json is what transformers derives from config.json."""
    out = builds[name]
    got = GenerationConfig.from_pretrained(out)
    want = GenerationConfig.from_model_config(AutoConfig.from_pretrained(out, trust_remote_code=True))
    assert got.to_diff_dict() == want.to_diff_dict()
    config = json.loads((out / "config.json").read_text())
    assert (got.bos_token_id, got.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])


def test_source_generation_config_is_copied(builds, sources):
    """transformers' save_pretrained wrote one into the source: the build carries it byte for byte."""
    for name in ("llama_pro", "ties"):
        src = sources["base-llama"] if name == "llama_pro" else sources["chat-llama"]
        assert (builds[name] / "generation_config.json").read_bytes() == (src / "generation_config.json").read_bytes()


# -- compose.json and compose verify ------------------------------------------------------------------

def test_new_files_are_recorded_and_checked(builds, tmp_path):
    """compose.json lists every file in the folder with its sha256, the card and generation config
    included, and the integrity check (what `compose verify` and every load of a build run) names an
    edited card. (`compose verify` of an ONNX build, these files in it, is tests/test_integrity.py's.)"""
    from compose import integrity
    from compose.errors import BuildError

    for name, out in builds.items():
        record = manifest(out)
        assert {"README.md", "generation_config.json"} <= set(record["files"]) & set(record["sha256"]), name
        assert sorted(p.name for p in out.iterdir()) == record["files"], name
        integrity.check(out)
    changed = tmp_path / "changed"
    shutil.copytree(builds["tiny"], changed)
    (changed / "README.md").write_text((changed / "README.md").read_text() + "\nedited\n")
    with pytest.raises(BuildError, match="README.md: changed since the build"):
        integrity.check(changed)
