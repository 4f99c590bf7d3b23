"""Lowering of `load`: a source checkpoint read by its family (compose.families) into a decoder chain of
Load expressions; with `model+adapter`, a PEFT LoRA adapter folded into the weights it adapts (the
adapter source's `fold`, compose.lora). Only config.json and safetensors headers are read here, never
tensor data."""
from __future__ import annotations

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
    d = asked or family.stored_dtype(src.config) or src.meta("model.embed_tokens.weight")[1]
    if d not in DTYPES:
        raise SourceError(f"{src.ref}: weights of dtype {d!r}; compose writes float32, bfloat16 or float16 "
                          "(pick one with dtype=...)")
    return d


def split_lora(ref: str, where: str) -> tuple[str, str | None]:
    """(model, adapter) of a reference: mergekit's `model+adapter`, one `+` between two non-empty parts."""
    if "+" not in ref:
        return ref, None
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

