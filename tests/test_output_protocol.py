"""The output protocol, as users hit it: a locked -o, nothing replaced that was not checked at the start,
no output over a source, no leftovers after a failure, an interrupt or a kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compose import load
from compose.errors import BuildError
from compose.pipeline import build

from conftest import save_hf_model

REPO = Path(__file__).resolve().parent.parent
SLOW = "tiny:llama?layers=24&hidden=512&intermediate=2048&heads=8&kv_heads=4"
"""About 300 MB to write: long enough to be caught mid-write."""


def cli(*args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "compose", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, **kw)


def spec(path: Path, ref: str = "tiny:llama?layers=2", body: str = "") -> Path:
    path.write_text(f"{body}from compose import load, expand_blocks\n"
                    f"model = expand_blocks(load({ref!r}), groups=1)\n")
    return path


def load_tiny():
    return load("tiny:llama?layers=2")


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".compose-" in p.name)


def one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("compose: error: "), r.stderr
    return lines[0]


def test_a_second_build_to_a_locked_output_fails_at_once(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from compose.output import OutputFolder\n"
         f"with OutputFolder(Path({str(out)!r}), False):\n    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = cli("build", str(spec(tmp_path / "s.py")), "-o", str(out), "--force", cwd=tmp_path)
        line = one_error_line(r)
        assert "another compose build is writing this folder" in line and str(out) in line
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0
    assert not out.exists() and leftovers(tmp_path) == []
    r = cli("build", str(spec(tmp_path / "s.py")), "-o", str(out), cwd=tmp_path)  # the lock went with it
    assert r.returncode == 0, r.stderr


def test_a_folder_created_during_the_build_is_not_replaced(tmp_path, monkeypatch):
    from compose.backends import hf

    out = tmp_path / "out"
    real_write = hf.write

    def write_while_someone_creates_out(*a, **kw):
        out.mkdir()
        (out / "precious.txt").write_text("mine")
        return real_write(*a, **kw)

    monkeypatch.setattr(hf, "write", write_while_someone_creates_out)
    with pytest.raises(BuildError, match="appeared during the build; nothing was replaced"):
        build(spec(tmp_path / "s.py"), out, progress=False)
    assert (out / "precious.txt").read_text() == "mine" and sorted(os.listdir(out)) == ["precious.txt"]
    assert leftovers(tmp_path) == []


def test_a_folder_swapped_during_a_forced_build_is_not_replaced(tmp_path, monkeypatch):
    from compose.backends import hf

    out = tmp_path / "out"
    out.mkdir()
    real_write = hf.write

    def write_while_out_is_swapped(*a, **kw):
        os.rename(out, tmp_path / "checked")
        out.mkdir()
        (out / "new.txt").write_text("not checked")
        return real_write(*a, **kw)

    monkeypatch.setattr(hf, "write", write_while_out_is_swapped)
    with pytest.raises(BuildError, match="was replaced by something else during the build"):
        build(spec(tmp_path / "s.py"), out, progress=False, force=True)
    assert sorted(os.listdir(out)) == ["new.txt"]


def test_a_spec_that_changes_directory_moves_nothing(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "out").mkdir(parents=True)
    (elsewhere / "out" / "keep.txt").write_text("keep")
    s = spec(tmp_path / "s.py", body=f"import os\nos.chdir({str(elsewhere)!r})\n")
    r = cli("build", str(s), "-o", "out", "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "config.json").is_file()
    assert sorted(os.listdir(elsewhere / "out")) == ["keep.txt"]


@pytest.mark.parametrize("where", ["same", "same build", "inside"])
def test_an_output_over_a_source_is_refused(tmp_path, where):
    if where == "same build":  # a compose build, which --force may replace, but not while it is read
        src = build(load_tiny(), tmp_path / "src", progress=False)
    else:
        src = save_hf_model(tmp_path / "src", "llama", layers=2)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = src / "sub" if where == "inside" else src
    r = cli("build", str(spec(tmp_path / "s.py", str(src))), "-o", str(out), "--force", cwd=tmp_path)
    line = one_error_line(r)
    if where == "same":  # not compose's: refused before the spec runs
        assert f"-o {src}: --force replaces only an empty folder or one compose wrote" in line
    else:
        assert f"the source folder {src}" in line
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_force_over_a_file_or_symlink_is_refused_and_moves_nothing(tmp_path, kind):
    """--force replaces a folder compose wrote, never a file, a link or the link's target."""
    out = tmp_path / "out"
    target = tmp_path / "target"
    if kind == "file":
        out.write_text("old")
    else:
        build(load_tiny(), target, progress=False)  # even a link to a build is not the build itself
        out.symlink_to(target)
    before = {p.name: p.read_bytes() for p in target.iterdir()} if kind == "symlink" else None
    r = cli("build", str(spec(tmp_path / "s.py")), "-o", str(out), "--force", cwd=tmp_path)
    assert f"is a {'file' if kind == 'file' else 'symbolic link'}, not a folder" in one_error_line(r)
    if kind == "file":
        assert out.read_text() == "old"
    else:
        assert out.is_symlink() and {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_a_failed_build_removes_the_parent_folders_it_created(tmp_path):
    bad = tmp_path / "s.py"
    bad.write_text("from compose import load, expand_blocks\n"
                   "model = expand_blocks(load('tiny:llama?layers=2'), groups=3)\n")
    r = cli("build", str(bad), "-o", str(tmp_path / "a" / "b" / "out"), cwd=tmp_path)
    assert "model.groups" in one_error_line(r)
    assert sorted(os.listdir(tmp_path)) == ["s.py"]


def _start_slow_build(tmp_path: Path, out: Path) -> subprocess.Popen:
    s = spec(tmp_path / "slow.py", SLOW)
    return subprocess.Popen([sys.executable, "-m", "compose", "build", str(s), "-o", str(out), "--workers", "1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_writing(tmp_path: Path, proc: subprocess.Popen) -> Path:
    """The temporary folder once its first shard has bytes in it."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        for p in tmp_path.glob(".out.compose-tmp-*"):
            shard = p / "model.safetensors"
            if shard.is_file() and shard.stat().st_size > 1 << 20:
                return p
        time.sleep(0.02)
    raise AssertionError("the build never started writing")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_terminated_build_removes_what_it_wrote(tmp_path, sig):
    out = tmp_path / "out"
    proc = _start_slow_build(tmp_path, out)
    _wait_for_writing(tmp_path, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"stopped by {sig.name}" in err and "Traceback" not in err
    assert not out.exists() and leftovers(tmp_path) == []


def test_what_a_kill_9_leaves_is_removed_by_the_next_build(tmp_path):
    out = tmp_path / "out"
    proc = _start_slow_build(tmp_path, out)
    stale = _wait_for_writing(tmp_path, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert stale.exists()  # nothing can clean up after SIGKILL in the process itself
    r = cli("build", str(spec(tmp_path / "s.py")), "-o", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"removed {stale}, left by an interrupted build" in r.stderr
    assert leftovers(tmp_path) == [] and (out / "config.json").is_file()


def test_an_output_that_holds_the_spec_or_a_source_is_refused(tmp_path):
    # A source kept inside an earlier build (which --force may replace, but not with the source in it).
    src = save_hf_model(build(load_tiny(), tmp_path / "models", progress=False) / "src", "llama", layers=2)
    s = spec(tmp_path / "s.py", str(src))
    line = one_error_line(cli("build", str(s), "-o", ".", "--force", cwd=tmp_path))
    assert "is the current directory" in line
    line = one_error_line(cli("build", str(s), "-o", str(tmp_path), "--force", cwd=tmp_path.parent))
    assert f"holds the spec file {s}" in line
    line = one_error_line(cli("build", str(s), "-o", str(tmp_path / "models"), "--force", cwd=tmp_path))
    assert f"holds the source folder {src}" in line
    assert (src / "config.json").is_file() and s.is_file()
