"""What a build folder records about its files (compose.json's sha256 of each), read with bounds, and files
read once and checked against it. The backends that run a build's own code (the generated module) take
its bytes from here; the front door's compose.integrity checks whole folders with the same pieces."""
from __future__ import annotations

import hashlib
import json
import os
import stat
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from compose.errors import BuildError, SourceError

MANIFEST = "compose.json"

MAX_MANIFEST_BYTES = 64 << 20
"""compose.json is read whole: its provenance lists every tensor, a few MB for the largest models."""

MAX_MANIFEST_NESTING = 100
"""compose.json nests the spec a few levels down; deeper than this is no spec compose wrote, and would run
json and whatever later walks the record into Python's recursion limit."""


def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading, refused unless it is a regular file (symlinks followed): a FIFO would
    block the read forever, and opening a device can have effects of its own, so it is looked at first."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise SourceError(f"{path}: not a regular file")
        # Non-blocking, so that a FIFO swapped in after the check cannot hang the open either.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise SourceError(f"{path}: not a regular file")
    return f


@contextmanager
def _open(path: Path):
    """`path` opened for reading if it is a regular file (a FIFO would hang the read), as a BuildError."""
    try:
        f = open_regular(path)
    except SourceError as e:
        raise BuildError(str(e)) from None
    with f:
        yield f


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with _open(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def manifest_of(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise BuildError(f"{folder}: not a compose build (no compose.json)")
    with _open(path) as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)  # bounded: the size on disk may change under us
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BuildError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes, too large for a compose.json")
    deep = BuildError(f"{path}: nested too deeply (more than {MAX_MANIFEST_NESTING} levels) to be a compose.json")
    try:
        record = json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise BuildError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise deep from None
    if _too_deep(record):
        raise deep
    if not isinstance(record, dict):
        raise BuildError(f"{path}: not a compose.json (a JSON object)")
    return record


def _too_deep(value) -> bool:
    """Whether `value` nests lists and objects more than MAX_MANIFEST_NESTING deep (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_MANIFEST_NESTING:
                return True
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))
    return False


def recorded_hashes(folder: Path, record: dict | None = None) -> dict[str, str]:
    """compose.json's file name -> sha256 (`record`, or read from `folder`), refused unless every file it
    lists (`files`, `shards`) has one: a file left out of the hashes would be trusted unchecked."""
    path = folder / MANIFEST
    record = manifest_of(folder) if record is None else record
    hashes = record.get("sha256")
    if not isinstance(hashes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise BuildError(f"{path}: records no file hashes (built by an older compose? rebuild)")
    files, shards = record.get("files", []), record.get("shards", {})
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise BuildError(f"{path}: `files` is not a list of file names")
    if not isinstance(shards, dict):
        raise BuildError(f"{path}: `shards` is not an object of file names")
    unhashed = sorted({*files, *shards} - set(hashes) - {MANIFEST})
    if unhashed:
        raise BuildError(f"{folder / unhashed[0]}: listed in compose.json but without a sha256 entry; "
                         "it cannot be checked (rebuild)")
    for name in hashes:
        if Path(name).name != name or name in (".", ".."):
            raise BuildError(f"{path}: file name {name!r} is not a plain name in the folder")
    return hashes


def read_checked(path: Path, hashes: dict[str, str]) -> bytes:
    """The bytes of `path`, read once and checked against its sha256 in `hashes`: what the caller goes on
    to use is exactly what was checked (reading the file again could give other bytes)."""
    if path.name not in hashes:
        raise BuildError(f"{path}: not written by the build (compose.json does not record it)")
    with _open(path) as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != hashes[path.name]:
        raise _changed(path)
    return data


def _changed(path: Path) -> BuildError:
    return BuildError(f"{path}: changed since the build (its sha256 differs from compose.json's); rebuild, or "
                      "restore the file")
