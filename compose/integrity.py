"""What a build folder claims about itself, checked: compose.json records the sha256 of every file the
build wrote (generated code included), and nothing in the folder is imported or trusted until the files
it is about to use match those hashes."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from compose.errors import BuildError

CODE_SUFFIXES = (".py", ".json", ".jinja")
"""Files whose contents decide what runs (code, configs naming classes): always checked before use."""

RUN_PATTERNS = ("*.py", "*.onnx", "*.onnx.data")
"""Files compose would import or run from a build folder: refused unless the build recorded them (an
export that failed half-way, or a file dropped in by hand)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def hash_files(folder: Path, files: list[str], known: dict[str, str] | None = None) -> dict[str, str]:
    """File name -> sha256 for `files` in `folder`; `known` hashes (the shards', taken as they were
    written) are not read again."""
    known = known or {}
    return {f: known[f] if f in known else sha256_file(folder / f) for f in sorted(files)}


def manifest_of(folder: Path) -> dict:
    path = folder / "compose.json"
    if not path.is_file():
        raise BuildError(f"{folder}: not a compose build (no compose.json)")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise BuildError(f"{path}: not a compose.json (a JSON object)")
    return record


def check(folder: Path, *, weights: bool = True) -> dict:
    """Raise, naming the file, if a file compose.json records is missing or changed, or a file that would
    be imported or run (RUN_PATTERNS) is not recorded at all. `weights=False` skips the (large) safetensors and ONNX
    files and checks only code and configs, which is what decides what runs. Returns compose.json."""
    record = manifest_of(folder)
    hashes = record.get("sha256")
    if not isinstance(hashes, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()):
        raise BuildError(f"{folder / 'compose.json'}: records no file hashes (built by an older compose? rebuild)")
    for name in sorted(hashes):
        path = folder / name
        if Path(name).name != name:
            raise BuildError(f"{folder / 'compose.json'}: file name {name!r} is not a plain name in the folder")
        if not weights and not name.endswith(CODE_SUFFIXES):
            continue
        if not path.is_file():
            raise BuildError(f"{path}: recorded in compose.json but missing")
        if sha256_file(path) != hashes[name]:
            raise BuildError(f"{path}: changed since the build (its sha256 differs from compose.json's); "
                             "rebuild, or restore the file")
    stray = sorted(p.name for pattern in RUN_PATTERNS for p in folder.glob(pattern) if p.name not in hashes)
    if stray:
        raise BuildError(f"{folder / stray[0]}: not written by the build (compose.json does not record it); "
                         "compose imports and runs only the code and graphs it wrote")
    return record


def forget_files(folder: Path, record: dict, names: list[str]) -> dict:
    """Delete `names` (files compose.json lists, plain names in `folder`) and drop them from the record: what
    an earlier export wrote that a new one replaces (the old model_with_past.onnx)."""
    listed = set(record.get("files") or [])
    gone = {n for n in names if n in listed and Path(n).name == n and n not in (".", "..")}
    for n in gone:
        (folder / n).unlink(missing_ok=True)
    hashes = {k: v for k, v in (record.get("sha256") or {}).items() if k not in gone}
    return {**record, "files": sorted(listed - gone), "sha256": hashes}


def record_files(folder: Path, record: dict, files: list[str]) -> dict:
    """compose.json with `files` (newly written into the folder) added to its file list and hashes."""
    hashes = dict(record.get("sha256") or {})
    hashes.update(hash_files(folder, files))
    listed = set(record.get("files") or []) | set(files)
    return {**record, "files": sorted(listed), "sha256": dict(sorted(hashes.items()))}
