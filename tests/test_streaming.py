"""Streaming at real size: plain copies are written as the source's bytes (never decoded), every produced
tensor is freed once written, and a non-finite value is found in copied bytes as in decoded ones."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from compose import build, depth_upscale, expand_blocks, load
from compose.backends.finite import finite_bytes
from compose.backends.shards import prefetch
from compose.sources import FolderSource
from conftest import read_tensors, save_hf_model


def test_plain_copies_are_bytes_never_decoded(tmp_path, monkeypatch):
    """SOLAR copies every tensor: not one is decoded, and the output holds the source's bytes."""
    src = save_hf_model(tmp_path / "src", "llama", layers=4)
    decoded = []
    real = FolderSource._read
    monkeypatch.setattr(FolderSource, "_read", lambda self, key: decoded.append(key) or real(self, key))
    out = build(depth_upscale(load(str(src)), drop=1), tmp_path / "out", progress=False)
    assert decoded == []
    got, want = read_tensors(out), read_tensors(src)
    # Layers [0, 3) then [1, 4): output layer 3 is source layer 1, output layer 5 is source layer 3.
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], want["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.5.self_attn.q_proj.weight"], want["model.layers.3.self_attn.q_proj.weight"])


def test_only_computed_tensors_are_decoded(tmp_path, monkeypatch):
    """LLaMA-Pro: the zeroed projections are computed, every copied tensor is bytes; a cast is decoded."""
    src = save_hf_model(tmp_path / "src", "llama", layers=2)
    decoded = []
    real = FolderSource._read
    monkeypatch.setattr(FolderSource, "_read", lambda self, key: decoded.append(key) or real(self, key))
    build(expand_blocks(load(str(src)), groups=1), tmp_path / "pro", progress=False)
    assert decoded == []  # zeros are made, not read
    build(expand_blocks(load(str(src), dtype="bfloat16"), groups=1), tmp_path / "bf16", progress=False)
    assert "model.embed_tokens.weight" in decoded  # float32 on disk, bfloat16 out: converted, so decoded
    assert read_tensors(tmp_path / "bf16")["model.embed_tokens.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_finite_bytes_reads_each_dtype(dtype):
    name = str(dtype).removeprefix("torch.")
    x = torch.tensor([0.0, -1.5, 3.0e4, -2.0**-14, 1.0], dtype=dtype)
    assert finite_bytes(bytearray(x.view(torch.uint8).numpy().tobytes()), name)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[2] = bad
        assert not finite_bytes(bytearray(y.view(torch.uint8).numpy().tobytes()), name), (name, bad)
    # A long tensor (vectorised body and tail): one bad value anywhere, of either sign, is found.
    long = torch.linspace(-3e4 if dtype != torch.float16 else -6e4, 6e4, 1000 + 13).to(dtype)
    assert finite_bytes(bytearray(long.view(torch.uint8).numpy().tobytes()), name)
    for at in (0, 1, 31, 500, 1011, 1012):
        for bad in (float("nan"), -float("nan"), float("inf"), float("-inf")):
            y = long.clone()
            y[at] = bad
            assert not finite_bytes(bytearray(y.view(torch.uint8).numpy().tobytes()), name), (name, at, bad)


def test_prefetch_keeps_no_result_once_consumed():
    """Each produced tensor is freed once the consumer has it and lets it go (a future holding its result
    kept the whole output in memory)."""
    refs = []

    def produce(i):
        t = torch.full((1000,), float(i))
        refs.append(weakref.ref(t))
        return t

    for i, t in enumerate(prefetch(list(range(20)), produce, workers=2, cost=lambda i: 1, budget=2)):
        assert t[0].item() == i
        del t
        gc.collect()
        # Alive: the one in hand, those produced ahead within the budget, and at most one a worker thread
        # has not let go of yet; never a growing pile of consumed ones.
        assert sum(r() is not None for r in refs) <= 4, i


def test_max_memory_refuses_before_writing_and_otherwise_changes_nothing(tmp_path):
    """--max-memory below one tensor's working set is refused, naming it, with nothing written; a budget
    that fits gives the same bytes as the default."""
    from compose.errors import BuildError

    from compose import merge

    a, b = load("tiny:llama?seed=1"), load("tiny:llama?seed=2")
    spec = merge.linear([a, b], weights=[0.3, 0.7])
    with pytest.raises(BuildError, match=r"--max-memory 10 kB: tensor model\.embed_tokens\.weight alone needs"):
        build(spec, tmp_path / "small", progress=False, max_memory="10kB")
    assert not (tmp_path / "small").exists() and list(tmp_path.iterdir()) == []
    build(spec, tmp_path / "bounded", progress=False, max_memory="1MB", workers=3)
    build(spec, tmp_path / "default", progress=False)
    bounded, default = (tmp_path / name / "model.safetensors" for name in ("bounded", "default"))
    assert bounded.read_bytes() == default.read_bytes()


def _raw_copies(tmp_path, sizes, check=lambda view: None):
    """RawCopy ranges of one source file of random bytes, with the file's bytes."""
    import os

    from compose.backends.shards import RawCopy

    data = os.urandom(sum(sizes))
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    copies, at = [], 0
    for n in sizes:
        copies.append(RawCopy(src, lambda: open(src, "rb"), at, n, check=check))
        at += n
    return data, copies


def test_read_ahead_and_write_behind_write_the_source_bytes_and_their_hash(tmp_path, monkeypatch):
    """Chunks read ahead on a thread into reused buffers while earlier ones are hashed and written, the
    written file's writeback started and dropped window by window: every byte and the sha256 are the
    file's own (a buffer refilled while it was still being hashed or written would show here)."""
    import hashlib

    from compose.backends import shards
    from compose.backends.shards import Entry, write_shard

    monkeypatch.setattr(shards.RawCopy, "CHUNK", 64)
    monkeypatch.setattr(shards.WriteBehind, "WINDOW", 128)
    sizes = [1000, 64, 1, 4096 + 7, 2 * 64 * shards.RawCopy.BUFFERS + 3]
    data, copies = _raw_copies(tmp_path, sizes)
    computed = torch.arange(300, dtype=torch.float32)  # a decoded tensor between the copies, in windows too
    # Sizes in bytes: plan them as a 1-byte dtype (write_shard checks every tensor against its planned size).
    monkeypatch.setitem(shards.BYTES, "bfloat16", 1)
    monkeypatch.setitem(shards.ST_CODES, "bfloat16", "U8")
    entries = [Entry(f"t{i}", (n,), "bfloat16") for i, n in enumerate(sizes)]
    entries.insert(2, Entry("computed", (1200,), "bfloat16"))
    items = [*copies[:2], computed, *copies[2:]]
    out = tmp_path / "out.safetensors"
    sha = write_shard(out, entries, iter(items))
    written = out.read_bytes()
    assert sha == hashlib.sha256(written).hexdigest()
    header = 8 + int.from_bytes(written[:8], "little")
    body = written[header:]
    expected = data[:1064] + computed.numpy().tobytes() + data[1064:]
    assert body == expected


def test_read_ahead_raises_the_checks_error_and_stops_its_thread(tmp_path, monkeypatch):
    import threading

    from compose.backends import shards
    from compose.errors import SourceError

    monkeypatch.setattr(shards.RawCopy, "CHUNK", 16)
    seen = []

    def check(view):
        seen.append(len(view))
        if len(seen) == 5:
            raise SourceError("chunk 5 holds NaN")

    _, (copy,) = _raw_copies(tmp_path, [16 * 40], check)
    before = threading.active_count()
    buffers = [bytearray(16) for _ in range(shards.RawCopy.BUFFERS)]
    got = 0
    with pytest.raises(SourceError, match="chunk 5"):
        for view in copy.chunks(buffers):
            got += 1
    assert got < 5 and threading.active_count() == before
    # A truncated source names the file.
    (tmp_path / "src.bin").write_bytes(b"x" * 100)
    short = shards.RawCopy(tmp_path / "src.bin", lambda: open(tmp_path / "src.bin", "rb"), 0, 640, lambda v: None)
    with pytest.raises(Exception, match="src.bin: ends inside a tensor"):
        for _ in short.chunks(buffers):
            pass
    assert threading.active_count() == before
