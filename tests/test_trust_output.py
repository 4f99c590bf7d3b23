"""Where compose writes, as an attacker or a careless script hits it (issue 29, items 1 and 2): `-o` is a
folder of its own or nothing, --force replaces only what compose wrote, exports write beside a build
through fresh names and rename into place only after their checks, and the commands that use a build
take its lock."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from compose import load
from compose.pipeline import build

TINY = "tiny:llama?layers=2"


def cli(*args, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compose", *args], cwd=cwd, capture_output=True, timeout=600,
                          env={**os.environ, **(env or {})})


def one_error_line(r: subprocess.CompletedProcess) -> str:
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compose: error: "), err
    return lines[0]


def spec(folder: Path) -> Path:
    path = folder / "s.py"
    path.write_text(f"from compose import load\nmodel = load({TINY!r})\n")
    return path


def snapshot(folder: Path) -> dict:
    """Every entry below `folder` (not following links): its kind and, for files, its bytes."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            out[str(p.relative_to(folder))] = (stat.S_IFMT(st.st_mode),
                                               p.read_bytes() if stat.S_ISREG(st.st_mode) else os.readlink(p)
                                               if stat.S_ISLNK(st.st_mode) else None)
    return out


# -- item 1: output targets ---------------------------------------------------------------------------------

def _make(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "character device":
        try:  # the numbers of /dev/null, made here: the test never touches the machine's own node
            os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs root")
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()
    elif kind == "file":
        path.write_text("a user's file")


@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
@pytest.mark.parametrize("kind", ["fifo", "character device", "socket", "file"])
def test_an_output_that_is_not_a_folder_is_refused_and_stays(tmp_path, kind, force):
    out = tmp_path / "out"
    _make(kind, out)
    before = snapshot(tmp_path)
    r = cli("build", str(spec(tmp_path)), "-o", str(out), *(["--force"] if force else []), cwd=tmp_path)
    assert f"-o {out}: is a {kind.replace('fifo', 'FIFO')}, not a folder" in one_error_line(r)
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "s.py"} == before


@pytest.mark.parametrize("kind", ["fifo", "character device"])
def test_extract_lora_takes_the_same_rules(tmp_path, kind):
    out = tmp_path / "out"
    _make(kind, out)
    before = snapshot(tmp_path)
    r = cli("extract-lora", "--model", "tiny:llama?layers=2&seed=1", "--base", TINY, "--rank", "2", "-o", str(out),
            "--force", cwd=tmp_path)
    assert f"is a {kind.replace('fifo', 'FIFO')}, not a folder" in one_error_line(r)
    assert snapshot(tmp_path) == before


def test_extract_lora_force_replaces_only_an_adapter_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    args = ("extract-lora", "--model", "tiny:llama?layers=2&seed=1", "--base", TINY, "--rank", "2", "-o", "out",
            "--force")
    line = one_error_line(cli(*args, cwd=tmp_path))
    assert "--force replaces only an empty folder or one compose wrote (holding adapter_config.json)" in line
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
    (tmp_path / "out" / "notes.txt").unlink()
    assert cli(*args, cwd=tmp_path).returncode == 0  # an empty folder is taken, and then its own output
    assert cli(*args, cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("out, what", [("", "-o: empty"), (".", "is the current directory"),
                                       ("..", "holds the current directory"),
                                       ("{parent}", "holds the current directory"),
                                       ("/", "not a folder name"), ("~", "is the home directory")])
def test_the_current_directory_its_parents_root_and_home_are_refused(tmp_path, out, what):
    """An unset $OUT (`-o ''`) with --force used to replace the current directory and delete its files."""
    here, home = tmp_path / "work" / "here", tmp_path / "home"
    for folder in (here, home):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text("the user's")
    s = spec(tmp_path)
    before = snapshot(tmp_path)
    r = cli("build", str(s), "-o", out.format(parent=here.parent), "--force", cwd=here, env={"HOME": str(home)})
    assert what in one_error_line(r)
    assert snapshot(tmp_path) == before


def test_force_replaces_a_folder_that_is_not_compose_s_only_when_empty(tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    line = one_error_line(cli("build", str(spec(tmp_path)), "-o", str(out), "--force", cwd=tmp_path))
    assert "--force replaces only an empty folder or one compose wrote (holding compose.json)" in line
    assert {k: v for k, v in snapshot(tmp_path).items() if k != "s.py"} == before
    (out / "data" / "thesis.tex").unlink()
    (out / "data").rmdir()
    r = cli("build", str(spec(tmp_path)), "-o", str(out), "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "compose.json").is_file()


def test_help_says_what_force_replaces():
    r = subprocess.run([sys.executable, "-m", "compose", "build", "--help"], capture_output=True, text=True,
                       timeout=60)
    text = " ".join(r.stdout.split())
    assert "an empty folder or one compose wrote (holding compose.json)" in text
    assert "a symlink's target, are never replaced" in text


# -- item 2: writes inside a build folder --------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A build with its ONNX export, made once; tests copy it."""
    from compose.cli import main

    out = build(load(TINY), tmp_path_factory.mktemp("exported") / "out", formats=["hf", "torch"], progress=False)
    assert main(["export", str(out), "--format", "onnx"]) == 0
    return out


def _copy(folder: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(folder, to)
    return to


def test_a_failed_export_leaves_the_good_one(tmp_path, exported, monkeypatch, capsys):
    """The export's check fails after the graph is written: the folder's files are the ones before."""
    from compose.backends import onnx
    from compose.cli import main
    from compose.errors import BuildError

    out = _copy(exported, tmp_path / "out")
    before = snapshot(tmp_path)

    def failing_check(folder, **kw):  # as the check fails on a NaN graph
        raise BuildError(f"{kw['graphs'] / 'model.onnx'}: non-finite output")

    monkeypatch.setattr(onnx, "verify", failing_check)
    assert main(["export", str(out), "--format", "onnx"]) == 2
    assert "non-finite output" in capsys.readouterr().err
    assert snapshot(tmp_path) == before  # model.onnx, genai_config.json, compose.json; no staging folder


def test_export_deletes_only_its_own_file_names(tmp_path, exported):
    """compose.json is not hashed: an edited onnx.files list naming the weights must not delete them."""
    out = _copy(exported, tmp_path / "out")
    record = json.loads((out / "compose.json").read_text())
    record["onnx"]["files"] += ["model.safetensors", "config.json", "tokenizer.json"]
    (out / "compose.json").write_text(json.dumps(record))
    weights = (out / "model.safetensors").read_bytes()
    r = cli("export", str(out), "--format", "onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").read_bytes() == weights and (out / "config.json").is_file()
    after = json.loads((out / "compose.json").read_text())
    assert "model.safetensors" in after["sha256"] and "config.json" in after["files"]
    assert cli("verify", str(out), cwd=tmp_path).returncode == 0


def test_export_replaces_a_link_at_its_file_name_never_its_target(tmp_path, exported):
    """A link planted where the export writes, to a file with the recorded bytes (so the build's own hash
    check passes): the export replaces the link and never writes the file it points to."""
    out = _copy(exported, tmp_path / "out")
    victim = tmp_path / "victim.json"
    victim.write_bytes((out / "genai_config.json").read_bytes())
    os.utime(victim, ns=(0, 0))
    (out / "genai_config.json").unlink()
    (out / "genai_config.json").symlink_to(victim)
    r = cli("export", str(out), "--format", "onnx", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not (out / "genai_config.json").is_symlink()
    assert victim.stat().st_mtime_ns == 0  # never opened for writing


def test_a_dangling_gguf_link_is_never_written_through(tmp_path, exported):
    out = _copy(exported, tmp_path / "out")
    target = tmp_path / "elsewhere.gguf"
    (out / "model.gguf").symlink_to(target)
    r = cli("export", str(out), "--format", "gguf", cwd=tmp_path)
    one_error_line(r)
    assert not target.exists() and not os.path.exists(target)


def _holder(folder: Path, exclusive: bool) -> subprocess.Popen:
    """Another compose process holding the folder's lock until its stdin closes."""
    code = ("import sys; from pathlib import Path; from compose.output import FolderLock\n"
            f"with FolderLock(Path({str(folder)!r}), exclusive={exclusive}):\n"
            "    print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_export_and_generate_take_the_build_lock(tmp_path, exported):
    out = _copy(exported, tmp_path / "out")
    before = snapshot(out)
    writer = _holder(out, exclusive=True)  # as a `build --force` to this folder holds it
    try:
        for args in (("export", str(out), "--format", "onnx"), ("generate", str(out), "--prompt", "hi",
                                                                  "--max-new-tokens", "2"), ("verify", str(out))):
            assert "another compose build is writing this folder" in one_error_line(cli(*args, cwd=tmp_path))
    finally:
        writer.communicate("", timeout=60)
    reader = _holder(out, exclusive=False)  # as a generate reading it
    try:
        line = one_error_line(cli("build", str(spec(tmp_path)), "-o", str(out), "--force", cwd=tmp_path))
        assert "another compose build is writing this folder now, or a command is reading it" in line
        r = cli("generate", str(out), "--prompt", "hi", "--max-new-tokens", "2", cwd=tmp_path)  # readers share
        assert r.returncode == 0, r.stderr
    finally:
        reader.communicate("", timeout=60)
    assert snapshot(out) == before
    assert not any(".compose-" in p.name for p in tmp_path.iterdir())  # the lock files went with the holders


# -- generate's inputs (item 6) --------------------------------------------------------------------------------

@pytest.mark.parametrize("args, what", [
    # the tiny model reads bytes after a bos token, and has 512 positions
    (("--prompt", "x" * 600), "--prompt: 601 tokens, longer than the model's context of 512 positions"),
    (("--prompt", "hi", "--max-new-tokens", "600"), "at most 509 new tokens fit"),
    (("--prompt", b"caf\xe9"), "--prompt 1: not valid UTF-8 text"),
    (("--prompt", "hi", "--seed", str(2 ** 70)), "--seed: must be 0 to 2**63 - 1"),
    (("--prompt", "hi", "--seed", "-1"), "--seed: must be 0 to 2**63 - 1"),
])
def test_generate_refuses_what_it_cannot_run(tmp_path, exported, args, what):
    assert what in one_error_line(cli("generate", str(exported), *args, cwd=tmp_path))
