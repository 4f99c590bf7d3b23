"""Bad input: one line naming the field, file or node; exit code 2; no traceback; no output folder."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_hf_model


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compose", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def assert_clean_failure(tmp_path: Path, spec: Path, *needles: str) -> None:
    out = tmp_path / "out"
    r = run_cli("build", str(spec), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compose: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "compose-tmp" in p.name]


def test_missing_source_folder(tmp_path):
    spec = write(tmp_path / "s.py", "from compose import load\nmodel = load('./no/such/model')\n")
    assert_clean_failure(tmp_path, spec, "model.ref", "./no/such/model", "no such folder")


def test_groups_that_do_not_divide_the_layers(tmp_path):
    spec = write(tmp_path / "s.py", "from compose import load, expand_blocks\n"
                                    "model = expand_blocks(load('tiny:llama?layers=8'), groups=3)\n")
    assert_clean_failure(tmp_path, spec, "model.groups", "3 does not divide", "8 layers")


def test_drop_not_less_than_layers(tmp_path):
    spec = write(tmp_path / "s.py", "from compose import load, depth_upscale\n"
                                    "model = depth_upscale(load('tiny:llama?layers=8'), drop=8)\n")
    assert_clean_failure(tmp_path, spec, "model.drop", "8 layers")


def test_slices_of_different_widths(tmp_path):
    spec = write(tmp_path / "s.py", "from compose import load, layers, stack\n"
                                    "model = stack(layers(load('tiny:llama'), 0, 4),\n"
                                    "              layers(load('tiny:llama?hidden=128'), 4, 8))\n")
    assert_clean_failure(tmp_path, spec, "model.slices[1]", "hidden 128", "64")


def test_yaml_spec_with_an_unknown_field(tmp_path):
    spec = write(tmp_path / "s.yaml", "model:\n  op: depth_upscale\n  drop: 2\n  dorp: 3\n"
                                      "  model: {op: load, ref: 'tiny:llama'}\n")
    assert_clean_failure(tmp_path, spec, "s.yaml", "model.dorp", "unknown field")


def test_corrupt_safetensors_file(tmp_path):
    src = save_hf_model(tmp_path / "src", "llama", layers=2)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated mid-data
    spec = write(tmp_path / "s.py", f"from compose import load, expand_blocks\n"
                                    f"model = expand_blocks(load({str(src)!r}), groups=2)\n")
    assert_clean_failure(tmp_path, spec, str(weights), "not a valid safetensors file")


def test_bad_dsl_argument_names_the_function_and_field(tmp_path):
    spec = write(tmp_path / "s.py", "from compose import load, expand_blocks\n"
                                    "model = expand_blocks(load('tiny:llama'), groups=0)\n")
    assert_clean_failure(tmp_path, spec, "expand_blocks.groups", "greater than 0")


def test_existing_output_is_refused_without_force(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    spec = write(tmp_path / "s.py", "from compose import load\nmodel = load('tiny:llama?layers=2')\n")
    r = run_cli("build", str(spec), "-o", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and "--force" in r.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_failed_build_leaves_no_folder_even_when_writing_fails(tmp_path, monkeypatch):
    """A failure half-way through writing weights removes the temporary folder."""
    from compose import build, load
    from compose.backends import shards
    from compose.errors import BuildError

    calls = {"n": 0}
    real = shards.write_shard

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(*a, **k)

    monkeypatch.setattr("compose.backends.hf.write_shard", failing)
    with pytest.raises(BuildError, match="cannot write the build .disk full"):
        build(load("tiny:llama?layers=2"), tmp_path / "out", max_shard_size="50KB", progress=False)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []


def test_python_error_in_a_spec_points_at_the_line(tmp_path):
    spec = write(tmp_path / "s.py", "from compose import load\nx = 1\nmodel = lod('tiny:llama')\n")
    assert_clean_failure(tmp_path, spec, "s.py line 3", "NameError", "lod")


def test_mergekit_config_keys_compose_does_not_handle_are_named(tmp_path):
    spec = write(tmp_path / "m.yml", "merge_method: linear\nchat_template: auto\n"
                                     "models:\n  - model: tiny:llama\n    parameters: {weight: 1}\n")
    assert_clean_failure(tmp_path, spec, "chat_template", "not supported yet")
    spec = write(tmp_path / "m.yml", "merge_method: linear\nmodles: []\n")
    assert_clean_failure(tmp_path, spec, "modles", "not a mergekit config key")


def test_merge_errors_exit_2_and_write_nothing(tmp_path):
    spec = write(tmp_path / "m.yml", "merge_method: ties\nmodels:\n  - model: tiny:llama\n"
                                     "    parameters: {weight: 1, density: 0.5}\n")
    assert_clean_failure(tmp_path, spec, "model.base", "needs a base model")
    spec = write(tmp_path / "s.py", "from compose import load, merge\n"
                                    "model = merge.linear([load('tiny:llama?layers=2'), load('tiny:llama?layers=2&intermediate=96')],"
                                    " weights=[1, 1])\n")
    assert_clean_failure(tmp_path, spec, "model.models[1]", "mlp.gate_proj.weight", "[96, 64]", "[128, 64]")
