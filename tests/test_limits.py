"""Limits before work, and one line for every bad flag: oversized specs are refused before anything is
built, a build larger than the disk (or --max-output-size) before anything is written, and `generate`,
`inspect` and the machine's own refusals (a name too long) answer in one line, exit code 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from compose.errors import BuildError


def cli(*args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    # The timeout is the test of "refused at once": a spec that hangs fails here instead of passing late.
    return subprocess.run([sys.executable, "-m", "compose", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compose: error: "), r.stderr
    return lines[0]


@pytest.mark.parametrize("body,needle", [
    ("expand_blocks(load('tiny:llama'), groups=4, per_group=1000000000)", "model.per_group: 1,000,000,000"),
    ("moe.upcycle(load('tiny:llama'), num_experts=100000)", "model.num_experts: 100,000 experts per layer"),
    ("moe.upcycle(load('tiny:llama?layers=512'), num_experts=512)", "make 262,144 expert FFNs"),
    ("stack(*[load('tiny:llama')] * 2000)", "model.slices: 2,000 slices make 2,000 layers"),
    ("merge.merge('linear', [load('tiny:llama')] * 2000)", "model.models: 2,000 models is more than compose merges"),
])
@pytest.mark.parametrize("command", ["inspect", "build"])
def test_an_oversized_spec_is_refused_before_any_work(tmp_path, body, needle, command):
    spec = tmp_path / "s.py"
    spec.write_text(f"from compose import load, expand_blocks, merge, moe, stack\nmodel = {body}\n")
    args = ["-o", str(tmp_path / "out")] if command == "build" else []
    line = one_line(cli(command, str(spec), *args, cwd=tmp_path, timeout=60))
    assert needle in line and "more than compose" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.py"]


def test_a_build_larger_than_max_output_size_writes_nothing(tmp_path):
    spec = tmp_path / "s.py"
    spec.write_text("from compose import load\nmodel = load('tiny:llama?layers=2')\n")
    line = one_line(cli("build", str(spec), "-o", str(tmp_path / "out"), "--max-output-size", "100kB", cwd=tmp_path))
    assert "would write 558.3 kB, more than --max-output-size 100.0 kB" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.py"]


def test_a_build_larger_than_the_free_disk_writes_nothing(tmp_path, monkeypatch):
    import shutil

    from compose import load
    from compose.pipeline import build

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(BuildError, match=r"would write 558.3 kB, and .* has 1.0 kB free"):
        build(load("tiny:llama?layers=2"), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def torch_build(tmp_path_factory) -> Path:
    from compose import load
    from compose.pipeline import build

    return build(load("tiny:llama?layers=2"), tmp_path_factory.mktemp("gen") / "out", formats=["hf", "torch"],
                 progress=False)


@pytest.mark.parametrize("flags,needle", [
    (["--max-new-tokens", "-5"], "--max-new-tokens: must be 1 to 65536, got -5"),
    (["--max-new-tokens", "1000000000"], "--max-new-tokens: must be 1 to 65536"),
    (["--temperature", "nan"], "--temperature: must be a finite number >= 0, got nan"),
    (["--temperature", "-1"], "--temperature: must be a finite number >= 0"),
    (["--temperature", "1", "--top-k", "-3"], "--top-k: must be at least 1, got -3"),
    (["--temperature", "1", "--top-p", "-1"], "--top-p: must lie in (0, 1], got -1.0"),
    (["--temperature", "1", "--top-p", "2"], "--top-p: must lie in (0, 1], got 2.0"),
    (["--temperature", "1", "--top-p", "nan"], "--top-p: must lie in (0, 1], got nan"),
    (["--device", "cuda"], "--device: cuda asked for, but torch sees no CUDA device"),
    (["--device", "tpu"], "--device: 'tpu' is not a device"),
])
def test_generate_validates_its_flags(torch_build, tmp_path, flags, needle):
    import torch

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    line = one_line(cli("generate", str(torch_build), "--prompt", "hi", *flags, cwd=tmp_path))
    assert needle in line, line


def test_dot_into_a_missing_folder_is_one_line(tmp_path):
    spec = tmp_path / "s.py"
    spec.write_text("from compose import load\nmodel = load('tiny:llama?layers=2')\n")
    line = one_line(cli("inspect", str(spec), "--dot", str(tmp_path / "no" / "g.dot"), cwd=tmp_path))
    assert "--dot" in line and "No such file or directory" in line


def test_a_deeply_nested_spec_is_one_line(tmp_path):
    spec = tmp_path / "deep.json"
    spec.write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    line = one_line(cli("build", str(spec), "-o", str(tmp_path / "out"), cwd=tmp_path))
    assert "deep.json" in line
    assert not (tmp_path / "out").exists()


def test_an_output_name_too_long_for_the_file_system_is_one_line(tmp_path):
    spec = tmp_path / "s.py"
    spec.write_text("from compose import load\nmodel = load('tiny:llama?layers=2')\n")
    line = one_line(cli("build", str(spec), "-o", str(tmp_path / ("x" * 300)), cwd=tmp_path))
    assert "File name too long" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.py"]
