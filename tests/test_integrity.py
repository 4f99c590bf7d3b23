"""Outputs are what they claim: compose.json hashes every file, nothing is imported from a folder whose
files changed, and nothing a source names (code, other tools' settings) is carried into an output."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from compose import load
from compose.integrity import sha256_file
from compose.pipeline import build

from conftest import load_hf, save_hf_model


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compose", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def torch_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "out"
    return build(load("tiny:llama?layers=2"), out, formats=["hf", "torch"], progress=False)


def copy_of(build_dir: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(build_dir, tmp_path / "copy"))


def test_compose_json_hashes_every_file_it_lists(torch_build):
    record = json.loads((torch_build / "compose.json").read_text())
    written = sorted(p.name for p in torch_build.iterdir())
    assert record["files"] == written
    assert sorted(record["sha256"]) == [f for f in written if f != "compose.json"]
    for name, digest in record["sha256"].items():
        assert sha256_file(torch_build / name) == digest, name
    assert "modeling_compose.py" in record["sha256"]


def test_a_tampered_generated_module_is_never_imported(torch_build, tmp_path):
    folder = copy_of(torch_build, tmp_path)
    marker = tmp_path / "ran"
    with open(folder / "modeling_compose.py", "a") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').write('imported')\n")
    for args in (["verify", str(folder)], ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"],
                 ["export", str(folder)]):
        r = cli(*args, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "modeling_compose.py: changed since the build" in r.stderr, r.stderr
    assert not marker.exists()


@pytest.mark.parametrize("stray", ["extra.py", "model.onnx"])
def test_code_or_a_graph_the_build_did_not_write_is_refused(torch_build, tmp_path, stray):
    folder = copy_of(torch_build, tmp_path)
    (folder / stray).write_text("print('hello')\n")
    command = ["verify", str(folder)] if stray.endswith(".onnx") else ["generate", str(folder), "--prompt", "hi"]
    r = cli(*command, cwd=tmp_path)
    assert r.returncode == 2 and f"{stray}: not written by the build" in r.stderr, r.stderr


def test_verify_names_a_weight_file_with_a_flipped_bit(torch_build, tmp_path):
    folder = copy_of(torch_build, tmp_path)
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    r = cli("verify", str(folder), cwd=tmp_path)
    assert r.returncode == 2 and f"{shard}: changed since the build" in r.stderr, r.stderr


def test_a_poisoned_source_config_carries_nothing_into_the_output(tmp_path):
    src = save_hf_model(tmp_path / "src", "llama", layers=2)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(auto_map={"AutoModelForCausalLM": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"},
               custom_pipelines={"x": {"impl": "evil.Pipe"}}, some_tool_setting=7)
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "evil.py").write_text("raise SystemExit('source code ran')\n")
    out = build(load(str(src)), tmp_path / "out", progress=False)
    written = json.loads((out / "config.json").read_text())
    assert not {"auto_map", "custom_pipelines", "some_tool_setting"} & set(written)
    assert "evil.py" not in {p.name for p in out.iterdir()}
    # What transformers' own class reads is still there, and the output loads with remote code allowed.
    assert written["initializer_range"] == cfg["initializer_range"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(load_hf(out)).__name__ == "LlamaForCausalLM"


def test_a_failed_export_leaves_no_graph_behind(torch_build, tmp_path, monkeypatch, capsys):
    from compose.backends import onnx
    from compose.cli import main
    from compose.errors import BuildError
    from compose.integrity import check

    folder = copy_of(torch_build, tmp_path)

    def half_written(model, inputs, outputs, path, k, *rest):
        path.write_bytes(b"half a graph")
        raise BuildError("ONNX export failed at node layers.1: a test's failure")

    monkeypatch.setattr(onnx, "_export", half_written)
    assert main(["export", str(folder)]) == 2
    assert "ONNX export failed at node layers.1" in capsys.readouterr().err
    assert not (folder / "model.onnx").exists()
    check(folder)  # the folder is as the build left it: a later export or verify is not refused
