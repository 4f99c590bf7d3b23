"""A safetensors file's header, checked by the rules the safetensors library itself applies when it opens
one (its Rust `read_metadata` and `Metadata::validate`): a file compose accepts is one transformers loads,
and a damaged one is named, with what is wrong and where, before any tensor is read.

The format: 8 bytes of little-endian header length n, n bytes of UTF-8 JSON (an object: `__metadata__`, a
string -> string map, and one entry per tensor with `dtype`, `shape`, `data_offsets`), then the data buffer.
Sorted by offset, the tensors' byte ranges tile the buffer from 0 with no gap or overlap, each exactly
its shape times its dtype's size, and the last one ends where the file ends.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

from compose.backends.record import open_regular  # noqa: F401  (sources read with it)
from compose.errors import SourceError

MAX_HEADER_BYTES = 100_000_000
"""safetensors' limit on the header length: a larger one is refused (HeaderTooLarge)."""

ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
"""The dtype codes compose reads, with their size in bytes."""

TORCH_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
                "I16": "int16", "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
                "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64"}
"""Each dtype code's torch dtype name (what a source's `meta` reports)."""


class _Invalid(Exception):
    """What makes a header invalid, said for the file's SourceError."""


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of the safetensors file `path` (as stored, `__metadata__` included) and the offset its
    data starts at, every entry checked; a SourceError naming the file and what is wrong otherwise."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            n, header = _parse(f, size)
            _check_buffer(8 + n + _check_tensors(header), size)
        except _Invalid as e:
            raise SourceError(f"{path}: not a valid safetensors file ({e})") from None
        except OSError as e:
            raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    return header, 8 + n


def _parse(f: BinaryIO, size: int) -> tuple[int, dict]:
    raw = f.read(8)
    if len(raw) < 8:
        raise _Invalid(f"{size} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > MAX_HEADER_BYTES:
        raise _Invalid(f"header length {n} is over safetensors' limit of {MAX_HEADER_BYTES} bytes")
    if 8 + n > size:
        raise _Invalid(f"header length {n} runs past the end of the {size}-byte file")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _Invalid(f"header is not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise _Invalid(f"header is not JSON ({e})") from None
    except RecursionError:
        raise _Invalid("header is JSON nested too deeply") from None
    if not isinstance(header, dict):
        raise _Invalid(f"header is a JSON {type(header).__name__}, not an object")
    _check_metadata(header.get("__metadata__"))
    return n, header


def _check_metadata(meta) -> None:
    # safetensors reads `__metadata__` as an optional string -> string map: null is as good as absent.
    if meta is None:
        return
    if not isinstance(meta, dict):
        raise _Invalid(f"__metadata__ is a JSON {type(meta).__name__}, not an object")
    for k, v in meta.items():
        if not isinstance(v, str):
            raise _Invalid(f"__metadata__ value of {k!r} is {v!r}, not a string")


def _check_tensors(header: dict) -> int:
    """Where the last tensor's data ends, once every entry and the layout of the buffer are checked."""
    ranges = sorted((_check_entry(k, v), k) for k, v in header.items() if k != "__metadata__")
    start, prev = 0, None
    for (begin, end), name in ranges:
        if begin != start:
            raise _Invalid(_misplaced(begin, start, prev, name))
        start, prev = end, name
    return start


def _check_entry(name: str, v) -> tuple[int, int]:
    """Tensor `name`'s entry checked on its own (types, dtype, size); its (begin, end) data offsets."""
    if not isinstance(v, dict):
        raise _Invalid(f"entry is a JSON {type(v).__name__}, not an object: tensor {name}")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in v:
            raise _Invalid(f"no {field}: tensor {name}")
    dtype, shape, offsets = v["dtype"], v["shape"], v["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
        raise _Invalid(f"unknown dtype {dtype!r} (compose reads {', '.join(ITEM_SIZES)}): tensor {name}")
    if not _naturals(shape):
        raise _Invalid(f"shape {shape!r} is not a list of non-negative integers: tensor {name}")
    if not _naturals(offsets) or len(offsets) != 2:
        raise _Invalid(f"data_offsets {offsets!r} is not two non-negative integers: tensor {name}")
    begin, end = offsets
    if end < begin:
        raise _Invalid(f"data_offsets {offsets} end before they begin: tensor {name}")
    nbytes = math.prod(shape) * ITEM_SIZES[dtype]
    if end - begin != nbytes:
        raise _Invalid(f"data_offsets {offsets} hold {end - begin} bytes, but shape {shape} of {dtype} is "
                       f"{nbytes}: tensor {name}")
    return begin, end


def _naturals(x) -> bool:
    return isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in x)


def _misplaced(begin: int, start: int, prev: str | None, name: str) -> str:
    """Why a tensor's data does not start where the previous one's ends (`start`)."""
    if prev is None:
        return f"the first tensor's data starts at byte {begin}, not 0: tensor {name}"
    if begin < start:
        return f"data_offsets overlap those of tensor {prev} (which ends at {start}): tensor {name}"
    return f"{begin - start} bytes of the buffer after tensor {prev} belong to no tensor: tensor {name}"


def _check_buffer(end: int, size: int) -> None:
    """The last tensor's data ends at byte `end` of the file: where the file ends (MetadataIncompleteBuffer)."""
    if size > end:
        raise _Invalid(f"{size - end} bytes after the last tensor's data; the data must end where the file ends")
    if size < end:
        raise _Invalid(f"tensor data runs past the end of the file ({end} > {size} bytes)")
