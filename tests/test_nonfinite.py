"""NaN and Inf never reach an output silently: bad parameters are refused where they enter, merges that
make non-finite values from finite inputs are errors naming the tensor and the parameters, and
non-finite source weights are an error (a warning with --allow-nonfinite)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_hf_model


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compose", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def failure(r: subprocess.CompletedProcess, out: Path) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compose: error: "), r.stderr
    assert not out.exists()
    return lines[0]


def yaml_merge(tmp_path: Path, method: str, params: str = "{}", base: bool = False,
               weights: tuple[str, str] | None = None) -> Path:
    """A merge of two tiny models; `weights` are each model's own `weight`."""
    base_line = "  base: {op: load, ref: 'tiny:llama?layers=2'}\n" if base else ""
    own = [f", parameters: {{weight: {w}}}" for w in weights] if weights else ["", ""]
    path = tmp_path / "merge.yaml"
    path.write_text(f"model:\n  op: merge\n  method: {method}\n{base_line}  models:\n"
                    f"    - {{model: {{op: load, ref: 'tiny:llama?layers=2'}}{own[0]}}}\n"
                    f"    - {{model: {{op: load, ref: 'tiny:llama?layers=2&seed=1'}}{own[1]}}}\n"
                    f"  parameters: {params}\n")
    return path


@pytest.mark.parametrize("params,needle", [
    ("{t: .nan}", "must be a finite number"),
    ("{t: .inf}", "must be a finite number"),
])
def test_non_finite_merge_parameters_are_refused_naming_the_field(tmp_path, params, needle):
    spec = yaml_merge(tmp_path, "slerp", params, base=True)
    line = failure(cli("build", str(spec), "-o", str(tmp_path / "out"), cwd=tmp_path), tmp_path / "out")
    assert "model.parameters.t: " in line and needle in line


@pytest.mark.parametrize("weights", [("0", "0"), ("1", "-1")])
def test_linear_weights_that_sum_to_zero_name_the_tensor_and_the_weights(tmp_path, weights):
    spec = yaml_merge(tmp_path, "linear", weights=weights)
    line = failure(cli("build", str(spec), "-o", str(tmp_path / "out"), cwd=tmp_path), tmp_path / "out")
    assert "linear" in line and "sum to 0" in line and "tensor model." in line


def test_a_merge_that_overflows_the_output_dtype_names_the_tensor(tmp_path):
    # Finite in float32, but 30000 times the weights is past float16's largest value (65504): Inf once cast.
    spec = yaml_merge(tmp_path, "linear", "{normalize: false}", weights=("30000", "30000"))
    r = cli("build", str(spec), "-o", str(tmp_path / "out"), "--dtype", "float16", cwd=tmp_path)
    line = failure(r, tmp_path / "out")
    assert "produced NaN or Inf from finite inputs" in line and "linear (" in line and "weight=" in line


def _poison(src: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def test_non_finite_source_weights_are_an_error_unless_allowed(tmp_path):
    src = save_hf_model(tmp_path / "src", "llama", layers=2)
    _poison(src, "model.layers.1.mlp.up_proj.weight")
    spec = tmp_path / "s.py"
    spec.write_text(f"from compose import load, expand_blocks\nmodel = expand_blocks(load({str(src)!r}), groups=1)\n")
    line = failure(cli("build", str(spec), "-o", str(tmp_path / "out"), cwd=tmp_path), tmp_path / "out")
    assert "model.layers.1.mlp.up_proj.weight holds NaN or Inf" in line and "--allow-nonfinite" in line

    r = cli("build", str(spec), "-o", str(tmp_path / "out"), "--allow-nonfinite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "warning: non-finite source tensors" in r.stderr and "model.layers.1.mlp.up_proj.weight" in r.stderr
    from safetensors.torch import load_file

    got = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.isnan(got["model.layers.1.mlp.up_proj.weight"]).any()  # carried as asked, not "fixed"


@pytest.mark.parametrize("rope", [{"theta": float("nan")}, {"type": "linear", "factor": float("inf")}])
def test_generated_code_never_holds_a_value_python_cannot_read_back(rope):
    import dataclasses

    from compose import load
    from compose.codegen import render_files
    from compose.errors import BuildError
    from compose.pipeline import compile_graph

    g = compile_graph(load("tiny:llama?layers=2"))
    bad = g.with_config(rope=dataclasses.replace(g.config.rope, **rope))
    assert render_files(g)  # the same graph with finite values renders
    with pytest.raises(BuildError, match=r"generated modeling_compose.py line \d+: a non-finite value \((nan|inf)\)"):
        render_files(bad)
