"""The command line and the output folder: formats, sharding, determinism, inspect, start-up cost."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import torch

from compose import build, expand_blocks, load
from compose.cli import main
from conftest import load_hf, logits, manifest, save_hf_model, token_ids

ROOT = Path(__file__).parents[1]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help_and_version_do_not_import_torch():
    code = ("import sys; from compose.cli import main\n"
            "try: main(['--version'])\nexcept SystemExit: pass\n"
            "try: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "compose 0.1.0" in r.stdout and "inspect" in r.stdout


def test_sharded_output_with_index_loads_and_is_deterministic(tmp_path):
    spec = ROOT / "specs" / "llama_pro.py"
    for name in ("a", "b"):
        assert main(["build", str(spec), "-o", str(tmp_path / name), "--max-shard-size", "300KB"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "model.safetensors.index.json" in files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1
    for f in files:  # byte-identical builds, compose.json included
        assert sha(tmp_path / "a" / f) == sha(tmp_path / "b" / f), f
    m = manifest(tmp_path / "a")
    assert m["shards"] == {f: sha(tmp_path / "a" / f) for f in shards}
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(m["provenance"])
    ids = token_ids()
    build(load("tiny:llama"), tmp_path / "plain", progress=False)
    assert torch.equal(logits(load_hf(tmp_path / "a"), ids), logits(load_hf(tmp_path / "plain"), ids))


def test_yaml_and_python_specs_build_identical_weights(tmp_path):
    main(["build", str(ROOT / "specs" / "solar.py"), "-o", str(tmp_path / "py")])
    main(["build", str(ROOT / "specs" / "solar.yaml"), "-o", str(tmp_path / "yaml")])
    assert sha(tmp_path / "py" / "model.safetensors") == sha(tmp_path / "yaml" / "model.safetensors")
    assert manifest(tmp_path / "py")["ir_hash"] == manifest(tmp_path / "yaml")["ir_hash"]


def test_force_replaces_and_dtype_converts(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "compose.json").write_text("{}")  # an earlier build's folder: --force replaces only those
    (out / "stale.txt").write_text("old")
    spec = ROOT / "specs" / "llama_pro.py"
    assert main(["build", str(spec), "-o", str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert not (out / "stale.txt").exists()
    model = load_hf(out)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    assert model.config.num_hidden_layers == 12


def test_tokenizer_and_generation_files_travel_with_the_embeddings(tmp_path):
    src = save_hf_model(tmp_path / "src", "llama", layers=2)
    (src / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (src / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')
    out = build(expand_blocks(load(str(src)), groups=1), tmp_path / "out", progress=False)
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 256}'
    assert (out / "generation_config.json").exists()
    assert "tokenizer_config.json" in manifest(out)["files"]


def test_inspect_summary_after_and_dot(tmp_path, capsys):
    dot = tmp_path / "g.dot"
    assert main(["inspect", str(ROOT / "specs" / "llama_pro.py"), "--dot", str(dot)]) == 0
    out = capsys.readouterr().out
    assert "summary" in out and "trainable         147,968" in out
    text = dot.read_text()
    assert text.startswith("digraph compose {") and '"layers.2" -> "layers.3"' in text
    assert "identity at init" in text
    assert main(["inspect", str(ROOT / "specs" / "llama_pro.py"), "--after", "nope"]) == 2
    assert "unknown stage 'nope'" in capsys.readouterr().err


def test_manifest_records_provenance_and_costs(tmp_path):
    out = build(expand_blocks(load("tiny:llama?layers=4"), groups=2), tmp_path / "o", progress=False)
    m = manifest(out)
    assert m["provenance"]["model.layers.2.self_attn.o_proj.weight"] == "zeros[64, 64]"
    assert m["provenance"]["model.layers.2.self_attn.q_proj.weight"] == (
        "load(tiny:llama?layers=4, model.layers.1.self_attn.q_proj.weight)")
    assert m["spec"]["model"]["op"] == "expand_blocks" and m["cost"]["layers"] == 6
    # The cost pass agrees with transformers' own parameter count.
    assert m["cost"]["params"] == load_hf(out).num_parameters()


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for cmd in ("pip install -e '.[dev]'", "pip install -e '.[peer]'", "python -m pytest -q"):
        assert f"\n{cmd}\n" in readme and cmd in ci
    assert "compose build specs/llama_pro.py -o out" in readme


def test_the_recorded_spec_rebuilds_the_same_model(tmp_path):
    """compose.json's `spec` is a JSON spec: building it again gives the same IR hash and bytes."""
    first = build(ROOT / "specs" / "passthrough.py", tmp_path / "first", progress=False)
    (tmp_path / "again.json").write_text(json.dumps({"model": manifest(first)["spec"]["model"]}))
    assert main(["build", str(tmp_path / "again.json"), "-o", str(tmp_path / "again")]) == 0
    assert manifest(tmp_path / "again")["ir_hash"] == manifest(first)["ir_hash"]
    assert sha(tmp_path / "again" / "model.safetensors") == sha(first / "model.safetensors")
