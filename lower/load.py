"""Lowering of `load`: a source checkpoint read by its family (compose.families) into a decoder chain of
Load expressions; with `model+adapter`, a PEFT LoRA adapter folded into the weights it adapts (the
adapter source's `fold`, compose.lora). Only config.json and safetensors headers are read here, never
tensor data."""
from __future__ import annotations

import os

from compose import families
from compose.errors import SourceError
from compose.ir.config import DTYPES
from compose.ir.graph import Graph
from compose.ir.nodes import Origin
from compose.ir.state import State
from compose.ir.weights import Expr, Load

EMBEDDING = "model.embed_tokens.weight"


class SourceReader:
    """The families' Reader over an opened source: a missing tensor names the spec field that needs it."""

    def __init__(self, src, path: str, adapter=None):
        self.src, self.path, self.adapter = src, path, adapter
        self._keys = set(src.keys())
        self.loaded: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self._keys

    def load(self, key: str, shape) -> Expr:
        if key not in self._keys:
            raise SourceError(f"{self.src.ref}: no tensor {key} (needed by {self.path})")
        stored, dtype = self.src.meta(key)
        base = Load(self.src.ref, key, stored, dtype)
        self.loaded.add(key)
        # A `model+adapter` reference: the adapter's LoRA folded into each weight it adapts (compose.lora).
        return self.adapter.fold(key, base) if self.adapter is not None else base


def output_dtype(src, family, asked: str | None) -> str:
    """The output dtype: asked for in the spec, else the config's, else the embedding's on disk."""
    d = asked or family.stored_dtype(src.config) or src.meta(EMBEDDING if EMBEDDING in src.keys() else src.keys()[0])[1]
    if d not in DTYPES:
        raise SourceError(f"{src.ref}: weights of dtype {d!r}; compose writes float32, bfloat16 or float16 "
                          "(pick one with dtype=...)")
    return d


def readings(ref: str) -> list[tuple[str, str | None]]:
    """Every way to read a reference: the whole of it as one model, then each `+` with something on both
    sides as mergekit's `model+adapter`."""
    return [(ref, None)] + [(ref[:i], ref[i + 1:]) for i in range(1, len(ref) - 1) if ref[i] == "+"]


def exists(ref: str) -> bool:
    """Whether `ref` is an existing path (a folder whose name may hold a `+`)."""
    return os.path.lexists(os.path.expanduser(ref))


def _may_name(ref: str, model: bool) -> bool:
    """Whether `ref` may name a model (an adapter), told without opening it (opening a hub id may download
    it): an existing path, a hub id as open_source reads one (`org/name`), or a built-in tiny model."""
    return (exists(ref) or (model and ref.startswith("tiny:"))
            or (not ref.startswith((".", "/", "~")) and ref.count("/") == 1))


def split_lora(ref: str, where: str) -> tuple[str, str | None]:
    """(model, adapter) of a reference. mergekit's `model+adapter` puts a `+` between a model and a LoRA
    adapter, but a folder's name may hold a `+` too: the one reading whose parts may exist is taken (a
    folder `my+model`, with no model `my` beside it), and a reference that reads two ways is refused
    rather than guessed (a folder `a+b` beside a model `a` and an adapter `b`). With no such reading, one
    `+` reads as `model+adapter`, so that what is missing is named when it is opened."""
    if "+" not in ref:
        return ref, None
    found = ([(ref, None)] if exists(ref) else []) + [
        (m, a) for m, a in readings(ref)[1:] if _may_name(m, True) and _may_name(a, False)]
    if len(found) > 1:
        said = [f"the folder {m!r}" if a is None else f"the model {m!r} with the LoRA adapter {a!r}" for m, a in found]
        raise SourceError(f"{where}: {ref!r} is ambiguous: {' or '.join(said)} (rename the folder)")
    if found:
        return found[0]
    parts = ref.split("+")
    if len(parts) != 2 or not all(parts):
        raise SourceError(f"{where}: {ref!r} is not `model+adapter` (one `+` between a model and a LoRA adapter)")
    return parts[0], parts[1]


def lower(spec, path: str, ctx) -> Graph:
    model_ref, adapter_ref = split_lora(spec.ref, f"{path}.ref")
    try:
        src = ctx.open(model_ref)
        adapter = ctx.open(f"lora:{adapter_ref}") if adapter_ref is not None else None
    except SourceError as e:
        raise SourceError(f"{path}.ref: {e}") from None
    fam = families.for_source(src.config, src.ref)
    reader = SourceReader(src, path, adapter)
    cfg = fam.arch_config(src.config, src.ref, output_dtype(src, fam, spec.dtype))
    if fam.derived:
        if adapter is not None:  # PEFT names modules as the class holds them in memory
            from compose.families.derived import in_memory_names

            reader.adapter = adapter = adapter.renamed(in_memory_names(src.config, src.ref))
        return _derived(src, fam, cfg, reader, adapter, path)
    embed = fam.embedding(cfg, reader)
    blocks = [fam.block(src.config, cfg, i, reader, Origin(src.ref, i)) for i in range(src.num_layers)]
    norm, head = fam.final_norm(cfg, reader), fam.head(cfg, reader, embed)
    if adapter is not None:
        adapter.check_folded(reader.loaded, src.ref, f"{path}.ref")
        if cfg.tie_embeddings and adapter.changes(EMBEDDING):
            # The tied head would have to change with it, and whether PEFT's merge keeps the tie depends on
            # how the adapter was saved (a modules_to_save copy unties it): refused rather than guessed.
            raise SourceError(f"{path}.ref: adapter {adapter_ref} changes the embeddings of {src.ref}, whose head is "
                              "tied to them; compose cannot fold that into a tied model")
    return Graph.decoder(cfg, embed, blocks, norm, head,
                         state=State(train="all", tokenizer=src.ref))



def _derived(src, fam, cfg, reader, adapter, path: str) -> Graph:
    """A source of a family derived from transformers' class (its headers were checked against the class when
    it was opened)."""
    from compose.families.derived import aliases

    stem, layers, tail = fam.read(src.config, reader, src.ref, aliases(src.config, src.keys(), src.ref))
    if adapter is not None:
        adapter.check_folded(reader.loaded, src.ref, f"{path}.ref")
    return Graph.layered(cfg, stem, layers, tail, state=State(train="all", tokenizer=src.ref))
