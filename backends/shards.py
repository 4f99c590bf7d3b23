"""A streaming safetensors writer: the header is planned from shapes up front, then each tensor is
produced, written and freed in turn, so writing a shard never holds more than one tensor.

The bytes are the safetensors format exactly (8-byte little-endian header length, JSON header padded
with spaces to a multiple of 8, then the raw little-endian data), readable by `safetensors.safe_open`.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from compose.errors import BuildError

ST_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = _BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str | int) -> int:
    """`5GB` -> 5e9 bytes (Hugging Face's decimal units); `2GiB` binary; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise BuildError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MB, 2GiB)")
    num, unit = float(m.group(1)), (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(num * base**power)


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


def write_shard(path: Path, entries: list[Entry], produce: Callable[[Entry], object],
                on_bytes: Callable[[int], None] = lambda n: None) -> str:
    """Write one shard, producing each tensor just before it is written; return the file's sha256."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": ST_CODES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    sha = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            sha.update(chunk)
        for e in entries:
            t = produce(e)
            data = memoryview(t.contiguous().reshape(-1).view(_uint8()).numpy())  # no copy
            if data.nbytes != e.nbytes:
                raise BuildError(f"tensor {e.name}: produced {data.nbytes} bytes, planned {e.nbytes}")
            f.write(data)
            sha.update(data)
            on_bytes(data.nbytes)
            del t, data
    return sha.hexdigest()


def write_index(path: Path, weight_map: dict[str, str], total: int) -> None:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    path.write_text(json.dumps(index, indent=2) + "\n")


def _uint8():
    import torch

    return torch.uint8
