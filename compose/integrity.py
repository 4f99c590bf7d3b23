"""What a build folder claims about itself, checked: compose.json records the sha256 of every file the
build wrote (generated code included), the folder holds nothing else, and nothing in it is imported or
trusted until the files it is about to use match those hashes."""
from __future__ import annotations

from pathlib import Path

from compose.backends.record import (MANIFEST, _changed, manifest_of, read_checked, recorded_hashes,  # noqa: F401
                                     sha256_file)
from compose.errors import BuildError

CODE_SUFFIXES = (".py", ".json", ".jinja")
"""Files whose contents decide what runs (code, configs naming classes): always checked before use."""


def hash_files(folder: Path, files: list[str], known: dict[str, str] | None = None) -> dict[str, str]:
    """File name -> sha256 for `files` in `folder`; `known` hashes (the shards', taken as they were
    written) are not read again."""
    known = known or {}
    return {f: known[f] if f in known else sha256_file(folder / f) for f in sorted(files)}


def check(folder: Path, *, weights: bool = True) -> dict:
    """Raise, naming the file, if the folder holds anything compose.json does not record (a bytecode cache
    Python would run instead of the checked code, a file dropped in by hand, half an export), or a file it
    records is missing or changed. `weights=False` skips hashing the (large) safetensors and ONNX files and
    checks only code and configs, which is what decides what runs. Returns compose.json."""
    record = manifest_of(folder)
    hashes = recorded_hashes(folder, record)
    # Looked at first, before hashing: a stray is refused whatever else is true of the folder.
    stray = sorted(p.name for p in folder.iterdir() if p.name not in hashes and p.name != MANIFEST)
    if "__pycache__" in stray:
        raise BuildError(f"{folder / '__pycache__'}: a bytecode cache the build did not write (Python could run "
                         "it in place of the checked code); remove it")
    if stray:
        raise BuildError(f"{folder / stray[0]}: not written by the build (compose.json does not record it); "
                         "remove it: compose uses only a folder the build wrote")
    for name in sorted(hashes):
        path = folder / name
        if not weights and not name.endswith(CODE_SUFFIXES):
            continue
        if not path.is_file():
            raise BuildError(f"{path}: recorded in compose.json but missing")
        if sha256_file(path) != hashes[name]:
            raise _changed(path)
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
