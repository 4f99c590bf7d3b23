"""A streaming safetensors writer: the header is planned from shapes up front, then each tensor is
produced, written and freed in turn, so writing holds only the tensors being produced (see `prefetch`).

The bytes are the safetensors format exactly (8-byte little-endian header length, JSON header padded
with spaces to a multiple of 8, then the raw little-endian data), readable by `safetensors.safe_open`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import queue
import re
import struct
import threading
from collections import deque
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from compose.errors import BuildError

ST_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """`5GB` -> 5e9 bytes (Hugging Face's decimal units); `2GiB` binary; a bare number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
        if not m:
            raise BuildError(f"{flag}: cannot read {text!r} (e.g. 5GB, 500MB, 2GiB)")
        num, unit = float(m.group(1)), (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
        value = int(num * base**power)
    if value < 1:
        raise BuildError(f"{flag}: must be at least 1 byte, got {text!r}")
    return value


def plan_shards(entries: list[Entry], max_bytes: int) -> list[list[Entry]]:
    """Fill shards in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class Cancelled(Exception):
    """An item the prefetcher did not produce: the stream was closed, or an item before it failed. The
    consumer never sees it (it stops at the failed item, or has gone)."""


def prefetch(items: list, produce: Callable, workers: int, cost: Callable = lambda x: 0,
             budget: float = float("inf")) -> Iterator:
    """`produce(item)` for each item, yielded in order, computed ahead on `workers` threads.

    Reading, merging and writing overlap (each releases the GIL). Memory is bounded by `budget`: items
    start in order, each once the estimated working memory (`cost`) of the items started and not yet
    handed to the consumer leaves room for it. The item the consumer waits for next finds nothing
    before it, so it always starts and the pipeline cannot deadlock; only an item larger than the
    budget on its own exceeds it. workers=1 produces each item just before it is consumed.

    A consumer that may stop early (a failed write, Ctrl-C) must close the stream (`contextlib.closing`):
    closing, or an item that fails, cancels the workers. Those waiting for room wake up and stop, those
    not started never start, and close returns once the ones producing have finished their item, so no
    thread outlives the stream (the pool's threads are joined at exit: one left waiting hangs the process).
    """
    if workers <= 1:
        yield from (produce(x) for x in items)
        return
    costs = [cost(x) for x in items]  # here, so that a bad cost fails in the consumer, not in a worker
    gate = threading.Condition()
    state = {"used": 0.0, "started": 0, "closed": False}

    def cancel() -> None:
        with gate:
            state["closed"] = True
            gate.notify_all()

    def run(i: int, x):
        c = costs[i]
        with gate:
            gate.wait_for(lambda: state["closed"] or (
                state["started"] == i and (state["used"] == 0 or state["used"] + c <= budget)))
            if state["closed"]:
                raise Cancelled(i)
            state["used"] += c
            state["started"] += 1
            gate.notify_all()
        try:
            return produce(x)
        except BaseException:
            # Every item before this one has started; the consumer stops here, so the ones after it are
            # not wanted: stop them now rather than once the consumer gets this far.
            cancel()
            raise

    pool = ThreadPoolExecutor(workers, thread_name_prefix="compose-prefetch")
    try:
        # A future holds its result until it is dropped: each one leaves the queue as it is consumed, or
        # every tensor produced would stay in memory until the end (the whole output, at 3B).
        futures = deque(pool.submit(run, i, x) for i, x in enumerate(items))
        for c in costs:
            result = futures.popleft().result()
            yield result
            del result
            with gate:
                state["used"] -= c
                gate.notify_all()
    finally:
        # Done, failed, or closed by a consumer that stopped: release the waiting items, drop the rest.
        cancel()
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class RawCopy:
    """A tensor written as the bytes a source file holds (a plain copy: SOLAR's and LLaMA-Pro's layers,
    passthrough slices), read in chunks and never decoded. `check` sees every chunk first (finiteness)."""

    path: Path
    open: Callable[[], BinaryIO]
    """Opens `path` for reading (the source's own opener: regular files only)."""
    offset: int
    nbytes: int
    check: Callable[[memoryview], None]

    CHUNK = 64 << 20
    BUFFERS = 4

    def chunks(self, buffers: list[bytearray]) -> Iterator[memoryview]:
        """The bytes, checked, in turn in each of `buffers` (CHUNK bytes each), read ahead on a thread of
        their own so the source is read while the writer writes (and waits on the disk). A chunk stays
        valid until the one after the next is asked for: the consumer writes a chunk and hashes it (on the
        Hasher thread, which finishes the previous chunk's hash before taking the next) before asking.
        Neither side waits for ever: the reader hands over every chunk or its error, and closing the
        generator (a failed write) stops the reader and waits for it."""
        if len(buffers) < 3:
            raise ValueError("RawCopy.chunks reads ahead: it needs at least three buffers")
        free: queue.Queue = queue.Queue()
        for b in buffers:
            free.put(b)
        ready: queue.Queue = queue.Queue()
        stop = threading.Event()

        def read() -> None:
            try:
                with self.open() as f:
                    f.seek(self.offset)
                    left = self.nbytes
                    while left and not stop.is_set():
                        buf = free.get()
                        if buf is None:
                            return
                        view = memoryview(buf)[:min(len(buf), left)]
                        got = f.readinto(view)
                        if not got:
                            raise BuildError(f"{self.path}: ends inside a tensor ({left} bytes short); the file "
                                             "changed or is truncated")
                        view = view[:got]
                        self.check(view)
                        ready.put((buf, view))
                        left -= got
            except BaseException as e:  # noqa: BLE001 -- handed to the consumer and raised there: an error
                ready.put((None, e))  # lost here would leave it waiting for a chunk that never comes

        reader = threading.Thread(target=read, name="compose-read-ahead", daemon=True)
        reader.start()
        try:
            left, held = self.nbytes, deque()
            while left:
                buf, view = ready.get()
                if buf is None:
                    raise view
                held.append(buf)
                if len(held) > 2:  # written and hashed: free for the reader
                    free.put(held.popleft())
                yield view
                left -= len(view)
        finally:
            stop.set()
            free.put(None)
            reader.join()

    def read_all(self) -> bytearray:
        """The bytes in one buffer of their own, checked chunk by chunk (see SharedBytes)."""
        data = bytearray(self.nbytes)
        view = memoryview(data)
        with self.open() as f:
            f.seek(self.offset)
            at = 0
            while at < self.nbytes:
                got = f.readinto(view[at:at + self.CHUNK])
                if not got:
                    raise BuildError(f"{self.path}: ends inside a tensor ({self.nbytes - at} bytes short); the file "
                                     "changed or is truncated")
                self.check(view[at:at + got])
                at += got
        return data


class SharedBytes:
    """Plain copies that several outputs are (the cse pass's shared loads: an upcycled FFN in E experts,
    LLaMA-Pro's copied block): each read once as bytes, never decoded, and dropped at its last use."""

    def __init__(self, uses: dict):
        self.slots = {key: [threading.Lock(), None, n] for key, n in uses.items()}

    def __contains__(self, key) -> bool:
        return key in self.slots

    def get(self, key, read: Callable[[], bytearray]) -> bytearray:
        slot = self.slots[key]
        with slot[0]:  # one thread reads; the others wait for its bytes
            data = slot[1] if slot[1] is not None else read()
            slot[2] -= 1
            slot[1] = data if slot[2] > 0 else None
        return data


class Hasher:
    """sha256 of a file's bytes on a thread of its own: hashlib releases the GIL over large buffers, so the
    hash of a tensor runs beside its write instead of after it (it was most of the writer's time)."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="compose-hash")
        self.pending = None

    def update(self, data) -> None:
        """Hash `data` (kept alive by the caller until `wait`), after what came before."""
        self.wait()
        self.pending = self.pool.submit(self.sha.update, data)

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def hexdigest(self) -> str:
        self.wait()
        self.close()
        return self.sha.hexdigest()

    def close(self) -> None:
        """Stop the thread, after a failure too (at most one hash is pending: it is finished first)."""
        self.pool.shutdown(wait=True)


class WriteBehind:
    """Starts the disk on what has been written as it is written, and drops it from the page cache a few
    windows later, so the disk writes from the first chunk instead of idling until the kernel's dirty
    threshold (10% of memory: gigabytes) and the build never fills the cache with its own output.

    Every WINDOW bytes, that range's writeback starts (`sync_file_range(WRITE)`: asynchronous); the range
    LAG windows back is then waited for and dropped. The writer stays at most LAG windows ahead of the disk:
    when the disk is the bottleneck that costs nothing, and it bounds the dirty memory. Where
    sync_file_range is missing (not Linux), `posix_fadvise(DONTNEED)` starts writeback of the range and
    drops what is clean; where that is missing too, nothing is done and the kernel writes back on its own.
    """

    WINDOW = 64 << 20
    LAG = 4
    _WRITE, _WAIT = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER

    def __init__(self, f: BinaryIO):
        self.f, self.fd = f, f.fileno()
        self.started = 0  # bytes whose writeback has started
        self.ranges: deque[tuple[int, int]] = deque()

    def wrote(self, end: int) -> None:
        """The file's bytes [0, end) have been handed to f.write."""
        if end - self.started < self.WINDOW:
            return
        self.f.flush()
        n = end - self.started
        if _sync_range(self.fd, self.started, n, self._WRITE):
            self.ranges.append((self.started, n))
        else:
            _fadvise_dontneed(self.fd, self.started, n)
        self.started = end
        while len(self.ranges) > self.LAG:
            off, n = self.ranges.popleft()
            _sync_range(self.fd, off, n, self._WAIT)
            _fadvise_dontneed(self.fd, off, n)


def _libc_sync_file_range():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()


def _sync_range(fd: int, off: int, n: int, flags: int) -> bool:
    """sync_file_range(2); False where it is missing or the file system refuses it."""
    return _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, off, n, flags) == 0


def _fadvise_dontneed(fd: int, off: int, n: int) -> None:
    try:
        os.posix_fadvise(fd, off, n, os.POSIX_FADV_DONTNEED)
    except (AttributeError, OSError):
        pass


def write_shard(path: Path, entries: list[Entry], tensors: Iterator,
                on_bytes: Callable[[int], None] = lambda n: None, done: Callable[[int], None] = os.close) -> str:
    """Write one shard, taking its tensors (or RawCopy byte ranges) from `tensors` in order; return the
    file's sha256. `done` gets a file descriptor of the complete file and closes it (a `Releaser` writes it
    back and drops its pages from the page cache, so a build does not leave its output cached)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": ST_CODES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    sha = Hasher()
    buffers = None
    with closing(sha), open(path, "wb") as f:
        behind = WriteBehind(f)
        at = 0
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            sha.update(chunk)
            at += len(chunk)
        for e in entries:
            t = next(tensors)
            if isinstance(t, RawCopy):
                if t.nbytes != e.nbytes:
                    raise BuildError(f"tensor {e.name}: the source holds {t.nbytes} bytes, planned {e.nbytes}")
                if buffers is None:  # made once per shard: one is hashed and written while the others are read
                    buffers = [bytearray(RawCopy.CHUNK) for _ in range(RawCopy.BUFFERS)]
                with closing(t.chunks(buffers)) as chunks:  # a failed write stops the reader at once
                    for view in chunks:
                        sha.update(view)  # waits for the previous chunk's hash first: its buffer is read next
                        f.write(view)
                        at += len(view)
                        behind.wrote(at)
                        on_bytes(len(view))
                sha.wait()
                continue
            if isinstance(t, bytearray):  # SharedBytes: a plain copy read once for several outputs
                data = memoryview(t)
            else:
                data = memoryview(t.contiguous().reshape(-1).view(_uint8()).numpy())  # no copy
            if data.nbytes != e.nbytes:
                raise BuildError(f"tensor {e.name}: produced {data.nbytes} bytes, planned {e.nbytes}")
            sha.update(data)
            for i in range(0, data.nbytes, WriteBehind.WINDOW):  # in windows, so writeback starts as it goes
                piece = data[i:i + WriteBehind.WINDOW]
                f.write(piece)
                at += piece.nbytes
                behind.wrote(at)
            on_bytes(data.nbytes)
            sha.wait()  # the hash still reads the tensor's memory
            del t, data
        f.flush()
        done(os.dup(f.fileno()))
    return sha.hexdigest()


class Releaser:
    """Finished files written back and dropped from the page cache on a thread of their own, so the writer
    goes on with the next shard meanwhile; `wait` returns once every file is on disk. As a context manager,
    it waits when the block succeeds and cancels when it fails."""

    def __init__(self):
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="compose-release")
        self.futures = []

    def __enter__(self) -> "Releaser":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.wait()
        else:
            self.cancel()

    def __call__(self, fd: int) -> None:
        self.futures.append((fd, self.pool.submit(self._release, fd)))

    @staticmethod
    def _release(fd: int) -> None:
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except (AttributeError, OSError):  # no fadvise on this platform or file system: the cache stays
            pass
        finally:
            os.close(fd)

    def wait(self) -> None:
        for _, f in self.futures:
            f.result()
        self.pool.shutdown()

    def cancel(self) -> None:
        """After a failure: the build is deleted, so the files not yet written back are only closed (the
        one being written back is finished)."""
        for fd, f in self.futures:
            if f.cancel():
                os.close(fd)
        self.pool.shutdown(wait=True)


def write_index(path: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")


def _uint8():
    import torch

    return torch.uint8
