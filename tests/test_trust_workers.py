"""Errors end the process: whatever fails while the prefetch workers run (a non-finite source found by the
writer or by a worker, a failed merge, a read error, Ctrl-C), every worker stops and the build exits with
its one line. The default --workers (2 or more) once left a worker waiting on the prefetcher's gate for a
writer that had gone, and the interpreter's exit waited for it for ever."""
from __future__ import annotations

import threading
from contextlib import closing
from pathlib import Path

import pytest

from conftest import save_hf_model
from test_limits import cli, one_line

POISONED = "model.embed_tokens.weight"
"""The largest tensor, so the first written: the other tensors are still queued behind it when it fails."""


def poison(folder: Path, name: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A clean 4-layer model, and copies of it with one NaN or one Inf in the first tensor written."""
    import shutil

    root = tmp_path_factory.mktemp("trust_workers")
    clean = save_hf_model(root / "clean", "llama", layers=4)
    made = {"clean": clean}
    for label, value in (("nan", float("nan")), ("inf", float("inf"))):
        made[label] = Path(shutil.copytree(clean, root / label))
        poison(made[label], POISONED, value)
    return made


SPECS = {
    # Plain copies: the writer finds the bad bytes while it streams them, with workers waiting on the gate.
    "copy": "model = load({bad!r})",
    # A merge: a worker finds the bad source while the other workers merge the tensors after it.
    "merge": "model = merge.linear([load({bad!r}), load({clean!r})], weights=[0.5, 0.5])",
}


@pytest.mark.parametrize("workers", [1, 2, 4])
@pytest.mark.parametrize("kind,value", [("copy", "nan"), ("copy", "inf"), ("merge", "nan")])
def test_a_non_finite_source_ends_the_build_with_one_line(tmp_path, sources, kind, value, workers):
    spec = tmp_path / "spec.py"
    spec.write_text("from compose import load, merge\n" +
                    SPECS[kind].format(bad=str(sources[value]), clean=str(sources["clean"])) + "\n")
    # The timeout is the test: a worker left waiting keeps the process alive after the error is printed.
    r = cli("build", str(spec), "-o", str(tmp_path / "out"), "--workers", str(workers), "--max-shard-size", "100KB",
            cwd=tmp_path, timeout=120)
    line = one_line(r)
    assert f"tensor {POISONED} holds NaN or Inf" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.py"]  # no output, no temporary folder


def ends(scenario) -> BaseException | None:
    """Run `scenario` on a thread of its own and return what it raised; a hang (a worker waiting for ever)
    fails here instead of hanging the suite. No thread it started may be left."""
    before, raised = set(threading.enumerate()), []

    def run():
        try:
            scenario()
        except BaseException as e:  # noqa: BLE001 -- KeyboardInterrupt included: it is what is tested
            raised.append(e)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    runner.join(timeout=60)
    assert not runner.is_alive(), "the prefetcher hung"
    assert [t for t in threading.enumerate() if t not in before] == []
    return raised[0] if raised else None


def test_a_failed_item_stops_the_items_queued_behind_it():
    """Item 1 fails while items 2.. wait for room in the budget: the consumer gets its error after item 0,
    the items queued behind it are never produced, and no worker is left."""
    from compose.backends.shards import prefetch

    produced, got = [], []

    def produce(i):
        produced.append(i)
        if i == 1:
            raise OSError("read error")
        return i

    def scenario():
        for x in prefetch(list(range(20)), produce, workers=4, cost=lambda i: 1, budget=2):
            got.append(x)

    assert isinstance(ends(scenario), OSError)
    assert got == [0]
    assert max(produced) <= 2  # at most the item started beside the failing one within the budget


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_a_consumer_that_stops_cancels_the_workers(error):
    """The writer fails (a bad chunk, a full disk) or the user presses Ctrl-C while workers wait at the gate
    and produce: closing the stream wakes and ends every one of them, and nothing more is produced."""
    from compose.backends.shards import prefetch

    produced = []

    def scenario():
        with closing(prefetch(list(range(50)), lambda i: produced.append(i) or i, workers=4, cost=lambda i: 1,
                              budget=3)) as stream:
            for x in stream:
                if x == 2:
                    raise error()

    assert isinstance(ends(scenario), error)
    assert max(produced) <= 2 + 3  # what the budget let start before the consumer stopped
