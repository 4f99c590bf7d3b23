"""Model sources: a reference (local HF folder, hub id, `tiny:<family>`) resolved to a config and tensors.

A source is opened once per process and read lazily, one tensor at a time: only its safetensors headers
are parsed up front (which is also where a corrupt file is caught and named). Weights are never unpickled:
a folder with only `.bin` files is refused. `reads` records every key handed out, so tests can check that
dropped layers are never read.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Callable
from urllib.parse import parse_qsl

from compose import families
from compose.errors import SourceError
from compose.families.tokenizer_files import PROCESSOR_FILES, TOKENIZER_FILES, check as check_tokenizer_files
from compose.families.tokenizer_files import check_processor
from compose.ir.weights import derive_seed
from compose.safetensors_header import (
    TORCH_DTYPES,
    open_regular,
    read_safetensors_header,
)

EXTRA_FILES = TOKENIZER_FILES + PROCESSOR_FILES + ("generation_config.json",)


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

    def span(self, key: str) -> tuple[Path, Callable[[], BinaryIO], int, int] | None:
        """(file, a function that opens it, offset, bytes) of the tensor's data as stored, for a plain copy
        that never decodes it; None when it is not stored as bytes (a tiny model is drawn). Counts as a
        read."""
        return None

    def _read(self, key: str):
        raise NotImplementedError

    def extra_files(self) -> list[Path]:
        """Tokenizer and generation files to copy into a build that takes its embeddings from here (the
        tokenizer files checked first: compose.families.tokenizer_files)."""
        if self.folder is None:
            return []
        check_tokenizer_files(self.folder)
        check_processor(self.folder)
        return [self.folder / f for f in EXTRA_FILES if (self.folder / f).is_file()]


# -- local folders ---------------------------------------------------------------------------------------

INDEX = "model.safetensors.index.json"


class FolderSource(Source):
    """A Hugging Face model folder. Its weight files are the shards its index names, else every
    `*.safetensors` in it; either way no tensor may be in two of them."""

    def __init__(self, folder: Path, ref: str | None = None):
        super().__init__()
        self.folder = folder
        self.ref = ref or str(folder)
        self.config = _read_config(folder)
        self._where: dict[str, tuple[Path, int, int]] = {}
        self._meta = {}
        index = folder / INDEX
        if os.path.lexists(index):
            self._read_indexed(index)
        else:
            for f in self._unindexed_files():
                self._add(f)

    def _read_indexed(self, index: Path) -> None:
        weight_map = _weight_map(index)
        root = _root(self.folder)
        shards: dict[str, Path] = {}
        for tensor, name in weight_map.items():
            if name not in shards:
                shards[name] = _shard_path(self.folder, root, index, tensor, name)
        for f in sorted(set(shards.values())):
            self._add(f)
        for tensor, name in weight_map.items():
            self._check_listed(index, tensor, name, shards[name])

    def _unindexed_files(self) -> list[Path]:
        files = sorted(self.folder.glob("*.safetensors"))
        if files:
            return files
        if list(self.folder.glob("*.bin")) or list(self.folder.glob("*.pt")):
            raise SourceError(f"{self.folder}: only pickled weights (.bin/.pt); compose reads safetensors "
                              "only (convert with `save_pretrained(..., safe_serialization=True)`)")
        raise SourceError(f"{self.folder}: no .safetensors weights")

    def _add(self, f: Path) -> None:
        """The tensors of weight file `f`, which must hold none that another file already did."""
        header, start = read_safetensors_header(f)
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if k in self._where:
                raise SourceError(f"{self.folder}: tensor {k} is in both {self._name(self._where[k][0])} and "
                                  f"{self._name(f)} (a model's weight files must not share tensors)")
            begin, end = v["data_offsets"]
            self._where[k] = (f, start + begin, end - begin)
            self._meta[k] = (tuple(v["shape"]), TORCH_DTYPES[v["dtype"]])

    def _check_listed(self, index: Path, tensor: str, name: str, shard: Path) -> None:
        """The index lists `tensor` in shard `name`: it must be there, not missing or in another shard."""
        if tensor not in self._where:
            raise SourceError(f"{index}: tensor {tensor} is listed in {name}, which does not hold it")
        held = self._where[tensor][0]
        if held != shard:
            raise SourceError(f"{index}: tensor {tensor} is listed in {name}, but it is in {self._name(held)}")

    def _name(self, f: Path) -> str:
        return str(f.relative_to(self.folder))

    def span(self, key: str) -> tuple[Path, Callable[[], BinaryIO], int, int] | None:
        if key not in self._where:
            raise SourceError(f"{self.ref}: no tensor named {key}")
        self.reads[key] += 1
        f, offset, nbytes = self._where[key]
        return f, lambda: open_regular(f), offset, nbytes

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
            with open_regular(f) as fh:
                mm = mmap.mmap(fh.fileno(), offset - start + nbytes, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as e:
            raise SourceError(f"{f}: cannot read tensor {key} ({e})") from None
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset - start)
        try:
            return flat.view(getattr(torch, dtype)).reshape(shape)
        except RuntimeError:  # data not aligned to its dtype in the file: take an aligned copy
            return flat.clone().view(getattr(torch, dtype)).reshape(shape)


def _read_json(path: Path):
    with open_regular(path) as f:
        try:
            return json.loads(f.read().decode("utf-8"))
        except ValueError as e:  # UnicodeDecodeError included
            raise SourceError(f"{path}: invalid JSON ({e})") from None
        except RecursionError:
            raise SourceError(f"{path}: invalid JSON (nested too deeply)") from None
        except OSError as e:
            raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not os.path.lexists(path):
        raise SourceError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise SourceError(f"{path}: config.json is a JSON {type(config).__name__}, not an object")
    return config


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name."""
    data = _read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise SourceError(f"{index}: invalid index (expected a JSON object whose weight_map is an object of "
                          "tensor name -> shard file)")
    for tensor, name in weight_map.items():
        if not isinstance(name, str):
            raise SourceError(f"{index}: invalid index (weight_map entry {tensor!r} is {name!r}, not a file name)")
    return weight_map


def _root(folder: Path) -> Path:
    """The folder an index's shards must resolve inside: the model folder, or for a snapshot in the
    Hugging Face cache (`models--org--name/snapshots/<revision>`) the repository's cache folder, since
    the cache links every snapshot file to `../../blobs/<hash>`."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def _shard_path(folder: Path, root: Path, index: Path, tensor: str, name: str) -> Path:
    """The shard `name` that the index lists `tensor` in: a relative path that stays inside `root`, also
    once symlinks are followed (an index is data, and must not make compose read files elsewhere)."""
    parts = PurePosixPath(name).parts
    if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
        raise SourceError(f"{index}: weight_map entry {tensor!r} names {name!r}, not a file in the model folder")
    path = folder / name
    try:
        inside = path.resolve().is_relative_to(root)
    except (OSError, RuntimeError) as e:  # a symlink loop
        raise SourceError(f"{path}: cannot read ({e})") from None
    if not inside:
        raise SourceError(f"{index}: weight_map entry {tensor!r} names {name!r}, a link to "
                          f"{path.resolve()}, outside the model folder")
    if not os.path.lexists(path):
        raise SourceError(f"{path}: shard listed in {index.name} is missing")
    return path


# -- hub ids ---------------------------------------------------------------------------------------------

def _hub_folder(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # noqa: BLE001 -- whatever the hub client raises, the answer is "not cached"
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
            raise SourceError(f"{repo_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 -- any failure of the download is reported by its type
        raise SourceError(f"{repo_id}: not a local folder, not in the Hugging Face cache, and the download "
                          f"failed ({type(e).__name__})") from None


# -- built-in tiny models --------------------------------------------------------------------------------

TINY_DEFAULTS = {"seed": 0, "layers": 8, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 512}
"""The options every `tiny:<family>` takes; a family adds its own (compose.families: `tiny_options`)."""


class TinySource(Source):
    """A deterministic random model: each tensor drawn from a generator seeded by (seed, tensor name). Its
    config.json and tensor names are its family's (`tiny_config`, `checkpoint_shapes`)."""

    def __init__(self, family: str, opts: dict[str, int]):
        super().__init__()
        self.opts = opts
        # Canonical: only the options that differ from the defaults, so `tiny:llama?layers=8` is `tiny:llama`.
        fam = families.get(families.TINY[family])
        defaults = dict(TINY_DEFAULTS, **fam.tiny_options)
        query = "&".join(f"{k}={opts[k]}" for k in sorted(opts) if opts[k] != defaults[k])
        self.ref = f"tiny:{family}" + (f"?{query}" if query else "")
        self.config = fam.tiny_config(opts)
        # Gemma's norms scale by 1 + weight: a gain near 1 is a weight near 0.
        self._unit_gain = 0.0 if fam.features.norm == "offset_rms" else 1.0
        self._meta = {k: (s, "float32") for k, s in fam.checkpoint_shapes(self.config, self.ref).items()}

    def _read(self, key: str):
        import torch

        shape = self._meta[key][0]
        g = torch.Generator().manual_seed(derive_seed(self.opts['seed'], key))
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        # Norm gains near 1 (not exactly 1, so a norm taken from the wrong layer shows in the logits).
        if key.endswith("norm.weight"):
            return self._unit_gain + 0.1 * x
        return 0.05 * x if key.endswith("bias") else 0.08 * x


TINY_BOUNDS = {"seed": (0, 2**63 - 1), "layers": (1, 1024), "hidden": (1, 65536), "intermediate": (1, 1 << 18),
               "heads": (1, 1024), "kv_heads": (1, 1024), "vocab": (1, 1 << 21), "tie": (0, 1), "window": (0, 1 << 20),
               "experts": (2, 1024), "pattern": (1, 1024)}
"""The range (least, most; None: no most) of every `tiny:` option, the families' own included."""
TINY_MAX_PARAMS = 20_000_000_000
"""A tiny model is drawn in float32 in memory: past this many parameters it is a typo, refused at once."""


def _parse_tiny(ref: str) -> TinySource:
    body = ref[len("tiny:"):]
    family, _, query = body.partition("?")
    if family not in families.TINY:
        raise SourceError(f"{ref}: unknown tiny family {family!r} (choose from {', '.join(families.TINY)})")
    opts = dict(TINY_DEFAULTS, **families.get(families.TINY[family]).tiny_options)
    for k, v in parse_qsl(query, keep_blank_values=True):
        if k not in opts:
            raise SourceError(f"{ref}: unknown option {k!r} (choose from {', '.join(sorted(opts))})")
        opts[k] = _tiny_option(ref, k, v)
    if opts["hidden"] % opts["heads"]:
        raise SourceError(f"{ref}: hidden {opts['hidden']} is not a multiple of heads {opts['heads']}")
    if opts["heads"] % opts["kv_heads"]:
        raise SourceError(f"{ref}: heads {opts['heads']} is not a multiple of kv_heads {opts['kv_heads']}")
    src = TinySource(family, opts)
    params = sum(math.prod(shape) for shape, _ in src._meta.values())
    if params > TINY_MAX_PARAMS:
        raise SourceError(f"{ref}: {params:,} parameters, more than a tiny model's {TINY_MAX_PARAMS:,} "
                          "(lower layers, hidden, intermediate or vocab)")
    return src


def _tiny_option(ref: str, k: str, v: str) -> int:
    """Option `k`'s value `v`: a plain decimal integer within TINY_BOUNDS."""
    if not re.fullmatch(r"-?[0-9]{1,20}", v):
        raise SourceError(f"{ref}: option {k} must be an integer of at most 20 digits, got {v[:40]!r}")
    n, (least, most) = int(v), TINY_BOUNDS[k]
    if n < least or (most is not None and n > most):
        raise SourceError(f"{ref}: option {k} must be {_range(least, most)}, got {n}")
    return n


def _range(least: int, most: int | None) -> str:
    if most is None:
        return f"at least {least}"
    return "0 or 1" if (least, most) == (0, 1) else f"between {least} and {most}"


# -- resolution ------------------------------------------------------------------------------------------

_OPEN: dict[str, Source] = {}


def open_source(ref: str) -> Source:
    """Resolve a reference to an opened source (cached: a build opens each source once)."""
    if ref in _OPEN:
        return _OPEN[ref]
    if ref.startswith("lora:"):  # a PEFT adapter of a `model+adapter` reference (compose.lora)
        from compose.lora import open_adapter

        adapter = open_adapter(ref[len("lora:"):])
        _OPEN[adapter.ref] = _OPEN[ref] = adapter
        return adapter
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
    if families.for_source(src.config, ref).derived:  # its headers against transformers' class, up front
        from compose.families.derived import aliases, check_checkpoint, derivation

        names = aliases(src.config, src.keys(), ref)
        shapes = {names.get(k, k): src.meta(k)[0] for k in src.keys()}
        if len(shapes) < len(src.keys()):
            raise SourceError(f"{ref}: two of its tensors are the same tensor of the class under two names")
        check_checkpoint(derivation(src.config, ref), shapes, ref)
    _OPEN[src.ref] = _OPEN[ref] = src
    return src


def clear_cache() -> None:
    """Forget opened sources (tests that rewrite a folder in place call this)."""
    _OPEN.clear()


def opened() -> list[Source]:
    """Every model source opened so far (adapters aside), once each, in the order they were opened."""
    from compose.lora import AdapterSource

    return [s for s in dict.fromkeys(_OPEN.values()) if not isinstance(s, AdapterSource)]


def opened_folders() -> list[Path]:
    """The folders of every source opened so far (an output must not overwrite one)."""
    return sorted({s.folder.resolve() for s in _OPEN.values() if s.folder is not None})
