"""ONNX files are reproducible, and the onnxruntime-vs-PyTorch check fails on NaN or Inf.

Two builds of one spec, in two processes, into two folders, give byte-identical graphs that name no path
of the machine they were built on. A build whose outputs are NaN does not pass the check: a NaN compares
false with every tolerance, so a check written as `diff > tol` alone would let it through."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from compose import build, load
from compose.backends import onnx
from compose.errors import BuildError

REPO = Path(__file__).resolve().parent.parent


def _onnx_files(folder: Path) -> dict[str, bytes]:
    """The graph, any external data beside it (`model.onnx.data`) and genai_config.json, by name."""
    return {p.name: p.read_bytes() for p in sorted([*folder.glob("*.onnx*"), *folder.glob("genai_config.json")])}


def test_two_builds_give_identical_onnx_files(tmp_path):
    """A LLaMA-Pro spec built twice by the CLI, each in its own process, into differently named folders
    (a small model: the export's time grows with the layers, its metadata does not)."""
    spec = tmp_path / "spec.py"
    spec.write_text("from compose import load, expand_blocks\n"
                    "model = expand_blocks(load('tiny:llama?layers=2'), groups=1)\n")
    outs = [tmp_path / "first", tmp_path / "second-build"]
    for out in outs:
        run = subprocess.run([sys.executable, "-m", "compose", "build", str(spec), "-o", str(out),
                              "--format", "hf,onnx", "--no-progress"], cwd=REPO, capture_output=True, text=True,
                             check=False)
        assert run.returncode == 0, run.stderr[-3000:]  # the CLI's own message, not CalledProcessError
    first, second = (_onnx_files(out) for out in outs)
    assert sorted(first) == ["genai_config.json", "model.onnx"]
    assert sorted(second) == sorted(first)
    for name, data in first.items():
        assert data == second[name], f"{name} differs between two builds"
        for path in (str(tmp_path), str(REPO), sysconfig.get_paths()["purelib"], "compose-tmp",
                     "compose_generated", "site-packages"):
            assert path.encode() not in data, (name, path)


def test_verify_fails_on_nan_outputs(tmp_path):
    """A final norm of NaN makes every logit NaN, in PyTorch and onnxruntime alike: an error naming the
    graph, not a pass with a difference of 0."""
    out = build(load("tiny:llama?layers=2"), tmp_path / "nan", formats=["hf", "torch"], progress=False)
    weights = load_file(out / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BuildError, match=r"model\.onnx: non-finite output .*onnxruntime's logits has \d+ NaN"):
        onnx.export(out)


@pytest.mark.parametrize("ort, torch_out, message", [
    (np.array([[np.nan, 1.0]]), np.array([[0.0, 1.0]]), r"onnxruntime's logits has 1 NaN and 0 Inf of 2 values"),
    (np.array([[0.0, 1.0]]), np.array([[np.inf, 1.0]]), r"PyTorch's logits has 0 NaN and 1 Inf of 2 values"),
    (np.array([[0.0, 1.0]]), np.array([0.0, 1.0]), r"logits has shape \(1, 2\) in onnxruntime, \(2,\) in PyTorch"),
])
def test_difference_names_what_is_wrong(ort, torch_out, message):
    """Only one side non-finite (an exporter or runtime bug, which no build makes on demand), or shapes
    that would broadcast into a comparison of the wrong elements."""
    with pytest.raises(BuildError, match=rf"^model\.onnx: .*{message}"):
        onnx._difference(Path("model.onnx"), ["logits"], [ort], [torch_out], "batch 1, sequence 2")
