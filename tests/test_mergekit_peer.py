"""Conformance with mergekit 0.1.5: the same config gives the same tensors (1e-5 relative), names,
shapes, dtypes and layer count. Runs when mergekit is installed (`pip install -e '.[peer]'`)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from compose.cli import main
from conftest import read_tensors, save_hf_model

pytestmark = pytest.mark.peer


def _zoo(root: Path, family: str) -> Path:
    """A base model and three fine-tunes of it (base + small noise), so task vectors mean something."""
    pytest.importorskip("mergekit")
    from safetensors.torch import load_file, save_file

    base = save_hf_model(root / "base", family, seed=0, layers=4)
    for i, name in enumerate(["a", "b", "c"], 1):
        shutil.copytree(base, root / name)
        g = torch.Generator().manual_seed(100 + i)
        tensors = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in load_file(base / "model.safetensors").items()}
        save_file(tensors, root / name / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    """family -> its zoo, each made on first use."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = _zoo(tmp_path_factory.mktemp(f"zoo_{family}"), family)
        return made[family]

    return get


@pytest.fixture(scope="module")
def zoo(zoos):
    return zoos("llama")


def run_mergekit(config: dict, out: Path) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))


def assert_same(ours: Path, theirs: Path) -> None:
    a, b = read_tensors(ours), read_tensors(theirs)
    assert sorted(a) == sorted(b)
    for k in b:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k].float(), b[k].float(), rtol=1e-5, atol=1e-6 * float(b[k].float().abs().max()),
                                   msg=lambda m: f"{k}: {m}")
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    assert ca["num_hidden_layers"] == cb["num_hidden_layers"]


CONFIGS = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.3}}]},
    "linear_filters": {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}]}},
        {"model": "b", "parameters": {"weight": [0.1, 0.9]}}]},
    "slerp": {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.7, 1]},
                                   {"filter": "mlp", "value": [1, 0.5, 0.3]}, {"value": 0.5}]}},
    "nuslerp": {"merge_method": "nuslerp", "models": [
        {"model": "a", "parameters": {"weight": 0.4}}, {"model": "b", "parameters": {"weight": 0.6}}]},
    "multislerp": {"merge_method": "multislerp", "models": [
        {"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 0.5}},
        {"model": "c", "parameters": {"weight": 0.5}}]},
    "karcher": {"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.8},
                        "models": [{"model": "a", "parameters": {"weight": 0.6}},
                                   {"model": "b", "parameters": {"weight": 0.4}}]},
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
             "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.3}},
                        {"model": "b", "parameters": {"weight": 0.5, "density": 0.6}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base",
                    "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.8, "gamma": 0.05}},
                               {"model": "b", "parameters": {"weight": 0.5, "density": 0.9}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base",
                         "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.8}},
                                    {"model": "b", "parameters": {"weight": 0.5, "density": 0.9}}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base",
                    "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]},
    "sce": {"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.5},
            "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]},
    "nearswap": {"merge_method": "nearswap", "base_model": "a", "parameters": {"t": 0.01},
                 "models": [{"model": "a"}, {"model": "b"}]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}]},
    "ram": {"merge_method": "ram", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]},
    "passthrough_slices": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "b", "layer_range": [1, 4]}]}]},
    "slerp_slices": {"merge_method": "slerp", "base_model": "a", "parameters": {"t": [0.1, 0.9]}, "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 2]}]},
        {"sources": [{"model": "a", "layer_range": [2, 4]}, {"model": "b", "layer_range": [2, 4]}],
         "parameters": {"t": [{"filter": "mlp", "value": 0.25}]}}]},
    # DARE and DELLA draw random masks; at density 1 they keep everything and are deterministic
    "dare_ties_density_1": {"merge_method": "dare_ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.7, "density": 1.0}},
        {"model": "b", "parameters": {"weight": 0.3, "density": 1.0}}]},
    "dare_linear_density_1": {"merge_method": "dare_linear", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.7, "density": 1.0}},
        {"model": "b", "parameters": {"weight": 0.3, "density": 1.0}}]},
    "della_density_1": {"merge_method": "della", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.7, "density": 1.0}},
        {"model": "b", "parameters": {"weight": 0.3, "density": 1.0}}]},
    "della_linear_density_1": {"merge_method": "della_linear", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.7, "density": 1.0}},
        {"model": "b", "parameters": {"weight": 0.3, "density": 1.0}}]},
    "ties_bf16_out": {"merge_method": "ties", "base_model": "base", "dtype": "float32", "out_dtype": "bfloat16",
                      "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                                 {"model": "b", "parameters": {"weight": 1.0, "density": 0.5}}]},
}


def _absolute(config: dict, root: Path) -> dict:
    """The config with model names turned into paths under `root` (both tools read the same files)."""
    def fix(v):
        if isinstance(v, dict):
            return {k: (str(root / x) if k in ("model", "base_model") and isinstance(x, str) else fix(x))
                    for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v
    return fix(config)


MAIN = ["ties", "slerp", "task_arithmetic", "dare_linear_density_1"]
"""The main methods, for the other families: Mistral's window, Qwen2's q/k/v biases, Qwen3's q/k norms and
own head_dim, Phi-3's fused q/k/v and gate/up (each merged as one tensor, as mergekit does), Gemma's four
norms per block (Gemma 3's q/k norms too)."""


@pytest.mark.parametrize("family,name", [("llama", n) for n in sorted(CONFIGS)]
                         + [(f, n) for f in ("mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3") for n in MAIN])
def test_same_tensors_as_mergekit(zoos, tmp_path, family, name):
    config = _absolute(CONFIGS[name], zoos(family))
    run_mergekit(config, tmp_path / "mergekit")
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    assert main(["build", str(tmp_path / "merge.yml"), "-o", str(tmp_path / "compose")]) == 0
    assert_same(tmp_path / "compose", tmp_path / "mergekit")


def test_mergekit_yaml_command_line(zoo, tmp_path):
    """The whole command, as a mergekit user runs it, on the same file as compose build."""
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(_absolute(CONFIGS["ties"], zoo)))
    exe = Path(sys.executable).parent / "mergekit-yaml"
    subprocess.run([str(exe), str(cfg), str(tmp_path / "mergekit"), "--no-copy-tokenizer"], check=True,
                   capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "compose", "build", str(cfg), "-o", str(tmp_path / "compose")],
                   check=True, capture_output=True, timeout=300)
    assert_same(tmp_path / "compose", tmp_path / "mergekit")
