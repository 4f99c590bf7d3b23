"""Model sources: a reference (local HF folder, hub id, `tiny:<family>`) resolved to a config and tensors.

A source is opened once per process and read lazily, one tensor at a time: only its safetensors headers
are parsed up front (which is also where a corrupt file is caught and named). Weights are never unpickled:
a folder with only `.bin` files is refused. `reads` records every key handed out, so tests can check that
dropped layers are never read.
"""
from __future__ import annotations

import json
import os
import struct
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qsl

from compose import families
from compose.errors import SourceError
from compose.ir.weights import derive_seed

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
               "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json", "chat_template.jinja")


class Source:
    ref: str
    config: dict
    folder: Path | None = None

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()

    @property
    def num_layers(self) -> int:
        n = self.config.get("num_hidden_layers")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SourceError(f"{self.ref}: config.json num_hidden_layers must be a positive integer, got {n!r}")
        return n

    _meta: dict[str, tuple[tuple[int, ...], str]]
    """Tensor name -> (shape, dtype), known before any data is read."""

    def keys(self) -> list[str]:
        return list(self._meta)

    def meta(self, key: str) -> tuple[tuple[int, ...], str]:
        """(shape, dtype) without reading data."""
        if key not in self._meta:
            raise SourceError(f"{self.ref}: no tensor named {key}")
        return self._meta[key]

    def tensor(self, key: str):
        self.reads[key] += 1
        return self._read(key)

    def _read(self, key: str):
        raise NotImplementedError

    def extra_files(self) -> list[Path]:
        """Tokenizer and generation files to copy into a build that takes its embeddings from here."""
        if self.folder is None:
            return []
        return [self.folder / f for f in EXTRA_FILES if (self.folder / f).is_file()]


# -- local folders ---------------------------------------------------------------------------------------

def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The header of a safetensors file and where its data starts, checked enough to name the file
    when it is corrupt (truncated, a header that lies about sizes, an unknown dtype)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        end = 0
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if v.get("dtype") not in _ST_DTYPES:
                raise ValueError(f"tensor {k} has unknown dtype {v.get('dtype')}")
            end = max(end, v["data_offsets"][1])
        if 8 + n + end > size:
            raise ValueError(f"tensor data runs past the end of the file ({8 + n + end} > {size} bytes)")
        return header, 8 + n
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise SourceError(f"{path}: not a valid safetensors file ({e})") from None


class FolderSource(Source):
    def __init__(self, folder: Path, ref: str | None = None):
        super().__init__()
        self.folder = folder
        self.ref = ref or str(folder)
        cfg = folder / "config.json"
        if not cfg.is_file():
            raise SourceError(f"{folder}: no config.json (expected a Hugging Face model folder)")
        try:
            self.config = json.loads(cfg.read_text())
        except ValueError as e:
            raise SourceError(f"{cfg}: invalid JSON ({e})") from None
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._meta = {}
        for f in self._weight_files():
            header, start = read_safetensors_header(f)
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                begin, end = v["data_offsets"]
                self._where[k] = (f, start + begin, end - begin)
                self._meta[k] = (tuple(v["shape"]), _ST_DTYPES.get(v["dtype"], v["dtype"]))

    def _weight_files(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise SourceError(f"{index}: invalid index ({e})") from None
            files = [self.folder / n for n in names]
            for f in files:
                if not f.is_file():
                    raise SourceError(f"{f}: shard listed in {index.name} is missing")
            return files
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        if list(self.folder.glob("*.bin")) or list(self.folder.glob("*.pt")):
            raise SourceError(f"{self.folder}: only pickled weights (.bin/.pt); compose reads safetensors "
                              "only (convert with `save_pretrained(..., safe_serialization=True)`)")
        raise SourceError(f"{self.folder}: no .safetensors weights")

    def _read(self, key: str):
        # Each tensor gets its own private mapping of its bytes, dropped with the tensor: no copy and no
        # zero-filled buffer (the pages come straight from the page cache), and unlike one mmap of the
        # whole file (safetensors' way), reading a model tensor by tensor never keeps it all resident.
        import mmap

        import torch

        f, offset, nbytes = self._where[key]
        shape, dtype = self._meta[key]
        if nbytes == 0:
            return torch.empty(shape, dtype=getattr(torch, dtype))
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            with open(f, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), offset - start + nbytes, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise SourceError(f"{f}: cannot read tensor {key} ({e})") from None
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset - start)
        try:
            return flat.view(getattr(torch, dtype)).reshape(shape)
        except RuntimeError:  # data not aligned to its dtype in the file: take an aligned copy
            return flat.clone().view(getattr(torch, dtype)).reshape(shape)


# -- hub ids ---------------------------------------------------------------------------------------------

def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise SourceError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:
        raise SourceError(f"{repo_id}: not a local folder, not in the Hugging Face cache, and the download "
                          f"failed ({type(e).__name__})") from None


# -- built-in tiny models --------------------------------------------------------------------------------

TINY_DEFAULTS = dict(seed=0, layers=8, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=512)
"""The options every `tiny:<family>` takes; a family adds its own (compose.families: `tiny_options`)."""


class TinySource(Source):
    """A deterministic random model: each tensor drawn from a generator seeded by (seed, tensor name). Its
    config.json and tensor names are its family's (`tiny_config`, `checkpoint_shapes`)."""

    def __init__(self, family: str, opts: dict[str, int]):
        super().__init__()
        self.opts = opts
        # Canonical: only the options that differ from the defaults, so `tiny:llama?layers=8` is `tiny:llama`.
        fam = families.get(family)
        defaults = dict(TINY_DEFAULTS, **fam.tiny_options)
        query = "&".join(f"{k}={opts[k]}" for k in sorted(opts) if opts[k] != defaults[k])
        self.ref = f"tiny:{family}" + (f"?{query}" if query else "")
        self.config = fam.tiny_config(opts)
        self._meta = {k: (s, "float32") for k, s in fam.checkpoint_shapes(self.config, self.ref).items()}

    def _read(self, key: str):
        import torch

        shape = self._meta[key][0]
        g = torch.Generator().manual_seed(derive_seed(self.opts['seed'], key))
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        # Norm gains near 1 (not exactly 1, so a norm taken from the wrong layer shows in the logits).
        if key.endswith("norm.weight"):
            return 1.0 + 0.1 * x
        return 0.05 * x if key.endswith("bias") else 0.08 * x


def _parse_tiny(ref: str) -> TinySource:
    body = ref[len("tiny:"):]
    family, _, query = body.partition("?")
    if family not in families.TINY:
        raise SourceError(f"{ref}: unknown tiny family {family!r} (choose from {', '.join(families.TINY)})")
    opts = dict(TINY_DEFAULTS, **families.get(family).tiny_options)
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in opts:
            raise SourceError(f"{ref}: unknown option {k!r} (choose from {', '.join(sorted(opts))})")
        try:
            opts[k] = int(v)
        except ValueError:
            raise SourceError(f"{ref}: option {k} must be an integer, got {v!r}") from None
    if opts["layers"] < 1 or opts["hidden"] % opts["heads"] or opts["heads"] % opts["kv_heads"]:
        raise SourceError(f"{ref}: needs layers >= 1, hidden divisible by heads, heads by kv_heads")
    return TinySource(family, opts)


# -- resolution ------------------------------------------------------------------------------------------

_OPEN: dict[str, Source] = {}


def open_source(ref: str) -> Source:
    """Resolve a reference to an opened source (cached: a build opens each source once)."""
    if ref in _OPEN:
        return _OPEN[ref]
    if ref.startswith("tiny:"):
        src: Source = _parse_tiny(ref)
    else:
        path = Path(ref).expanduser()
        if path.exists():
            if not path.is_dir():
                raise SourceError(f"{ref}: not a folder (expected a Hugging Face model folder)")
            src = FolderSource(path.resolve())
        elif ref.startswith((".", "/", "~")) or ref.count("/") != 1:
            raise SourceError(f"{ref}: no such folder")
        else:
            src = FolderSource(_hub_folder(ref), ref=ref)
    families.for_source(src.config, ref)
    _OPEN[src.ref] = _OPEN[ref] = src
    return src


def clear_cache() -> None:
    """Forget opened sources (tests that rewrite a folder in place call this)."""
    _OPEN.clear()
