"""A build folder is trusted no further than checked: the generated code that runs is the bytes checked
against compose.json (never a __pycache__ beside them), the folder holds nothing compose.json does not
record, every file it lists has a hash, and a hostile compose.json is one line of error."""
from __future__ import annotations

import importlib.util
import json
import marshal
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from compose import calm, load
from compose.backends.torch import load_module
from compose.cli import main
from compose.errors import BuildError
from compose.integrity import check
from compose.pipeline import build

COMMANDS = {
    "verify": lambda folder: ["verify", str(folder)],
    "export": lambda folder: ["export", str(folder)],
    "generate": lambda folder: ["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "2"],
}


@pytest.fixture(scope="module")
def torch_build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "out"
    return build(load("tiny:llama?layers=2"), out, formats=["hf", "torch"], progress=False)


@pytest.fixture
def folder(torch_build, tmp_path) -> Path:
    return Path(shutil.copytree(torch_build, tmp_path / "copy"))


def state(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes: what must not move."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(capsys, args: list[str], *needles: str) -> str:
    """Run the CLI; assert it exits 2 with one `compose: error:` line naming every needle."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("compose: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def plant_bytecode(folder: Path, code: str, *, unchecked_hash: bool) -> Path:
    """A pyc of other code where Python looks for modeling_compose.py's: a header with the .py's mtime and
    size (so an import takes it for the cache of the unchanged source), or an unchecked hash-based one (which
    an import never compares with the source)."""
    py = folder / "modeling_compose.py"
    pyc = Path(importlib.util.cache_from_source(str(py)))
    pyc.parent.mkdir(exist_ok=True)
    if unchecked_hash:
        header = struct.pack("<I", 0b01) + b"\0" * 8
    else:
        st = py.stat()
        header = struct.pack("<III", 0, int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
    pyc.write_bytes(importlib.util.MAGIC_NUMBER + header + marshal.dumps(compile(code, str(py), "exec")))
    return pyc


# -- the bytecode cache ---------------------------------------------------------------------------------

@pytest.mark.parametrize("unchecked_hash", [False, True], ids=["mtime-and-size", "unchecked-hash"])
def test_a_planted_bytecode_cache_is_refused_and_never_run(folder, tmp_path, capsys, unchecked_hash):
    marker = tmp_path / "ran"
    plant_bytecode(folder, f"open({str(marker)!r}, 'w').write('planted bytecode ran')\n",
                   unchecked_hash=unchecked_hash)
    before = state(folder)
    for command, args in COMMANDS.items():
        refused(capsys, args(folder), f"{folder / '__pycache__'}: a bytecode cache")
        assert not marker.exists(), command
    assert state(folder) == before


def test_generate_writes_no_bytecode_cache_into_the_build(folder, tmp_path):
    """With Python free to write bytecode (PYTHONDONTWRITEBYTECODE unset), as a user's shell runs it."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    r = subprocess.run([sys.executable, "-m", "compose", *COMMANDS["generate"](folder)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (folder / "__pycache__").exists()
    check(folder)  # and the folder is still one every command accepts


def test_generated_code_runs_from_the_checked_bytes(folder):
    """load_module (what generate, export and verify import with) checks the code it runs itself, not
    trusting an earlier check of the folder; a folder with no compose.json is not a build."""
    module = load_module(folder)
    assert module.__name__.startswith("compose_generated_") and hasattr(module, "ComposeForCausalLM")
    assert not (folder / "__pycache__").exists()
    with open(folder / "modeling_compose.py", "a") as f:
        f.write("\nraise SystemExit('edited code ran')\n")
    with pytest.raises(BuildError, match="modeling_compose.py: changed since the build"):
        load_module(folder)
    (folder / "compose.json").unlink()
    with pytest.raises(BuildError, match="not a compose build"):
        load_module(folder)


def test_a_composite_imports_its_siblings_from_checked_bytes(tmp_path):
    """CALM's modeling_compose.py imports modeling_compose_anchor.py and _augment.py: as submodules of the
    checked package, not by path (which reads __pycache__); an edited sibling is refused."""
    out = build(calm(anchor=load("tiny:llama?layers=2"), augment=load("tiny:qwen2?layers=2"), every=1),
                tmp_path / "calm", progress=False)
    module = load_module(out)
    assert module.anchor.__name__ == f"{module.__name__}.modeling_compose_anchor"
    assert module.augment.__name__ == f"{module.__name__}.modeling_compose_augment"
    assert not (out / "__pycache__").exists()
    with open(out / "modeling_compose_augment.py", "a") as f:
        f.write("\nraise SystemExit('edited sibling ran')\n")
    with pytest.raises(BuildError, match="modeling_compose_augment.py: changed since the build"):
        load_module(out)


# -- what compose.json records --------------------------------------------------------------------------

@pytest.mark.parametrize("stray", ["notes.txt", ".hidden", "subfolder"])
@pytest.mark.parametrize("command", ["verify", "generate"])
def test_a_file_compose_json_does_not_record_is_refused(folder, capsys, stray, command):
    if stray == "subfolder":
        (folder / stray).mkdir()
        (folder / stray / "x.py").write_text("print('hello')\n")
    else:
        (folder / stray).write_text("hello\n")
    before = state(folder)
    refused(capsys, COMMANDS[command](folder), f"{folder / stray}: not written by the build")
    assert state(folder) == before


def test_a_file_without_a_sha256_entry_is_refused_by_verify(folder, capsys):
    """Removing the weights' hash would otherwise let verify pass edited weights."""
    record = json.loads((folder / "compose.json").read_text())
    del record["sha256"]["model.safetensors"]
    (folder / "compose.json").write_text(json.dumps(record))
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    before = state(folder)
    refused(capsys, COMMANDS["verify"](folder), f"{shard}: listed in compose.json but without a sha256 entry")
    assert state(folder) == before


# -- a hostile compose.json -----------------------------------------------------------------------------

@pytest.mark.parametrize("command, depth", [("verify", 500), ("verify", 100_000), ("export", 100_000),
                                            ("generate", 100_000)])
def test_a_deeply_nested_compose_json_is_one_line(folder, capsys, command, depth):
    """500 levels json reads (but no compose.json nests so deep, and a reader that recurses over the record
    would meet Python's limit); 100,000 json itself cannot read."""
    text = (folder / "compose.json").read_text().rstrip()
    (folder / "compose.json").write_text(text[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}")
    before = state(folder)
    refused(capsys, COMMANDS[command](folder), "compose.json: nested too deeply")
    assert state(folder) == before


def test_an_oversized_compose_json_is_refused_before_it_is_parsed(folder, capsys, monkeypatch):
    from compose.backends import record

    monkeypatch.setattr(record, "MAX_MANIFEST_BYTES", 1000)
    refused(capsys, COMMANDS["verify"](folder), "compose.json: larger than 1000 bytes")
