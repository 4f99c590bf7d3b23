"""Lowering of `load`: a source checkpoint read by its family (compose.families) into a decoder chain of
Load expressions. Only config.json and safetensors headers are read here, never tensor data."""
from __future__ import annotations

from compose import families
from compose.errors import SourceError
from compose.ir.config import DTYPES
from compose.ir.graph import Graph
from compose.ir.nodes import Origin
from compose.ir.state import State
from compose.ir.weights import Expr, Load


class SourceReader:
    """The families' Reader over an opened source: a missing tensor names the spec field that needs it."""

    def __init__(self, src, path: str):
        self.src, self.path = src, path
        self._keys = set(src.keys())

    def has(self, key: str) -> bool:
        return key in self._keys

    def load(self, key: str, shape) -> Expr:
        if key not in self._keys:
            raise SourceError(f"{self.src.ref}: no tensor {key} (needed by {self.path})")
        stored, dtype = self.src.meta(key)
        return Load(self.src.ref, key, stored, dtype)


def output_dtype(src, family, asked: str | None) -> str:
    """The output dtype: asked for in the spec, else the config's, else the embedding's on disk."""
    d = asked or family.stored_dtype(src.config) or src.meta("model.embed_tokens.weight")[1]
    if d not in DTYPES:
        raise SourceError(f"{src.ref}: weights of dtype {d!r}; compose writes float32, bfloat16 or float16 "
                          "(pick one with dtype=...)")
    return d


def lower(spec, path: str, ctx) -> Graph:
    try:
        src = ctx.open(spec.ref)
    except SourceError as e:
        raise SourceError(f"{path}.ref: {e}") from None
    fam = families.for_source(src.config, src.ref)
    reader = SourceReader(src, path)
    cfg = fam.arch_config(src.config, src.ref, output_dtype(src, fam, spec.dtype))
    embed = fam.embedding(cfg, reader)
    blocks = [fam.block(src.config, cfg, i, reader, Origin(src.ref, i)) for i in range(src.num_layers)]
    return Graph.decoder(cfg, embed, blocks, fam.final_norm(cfg, reader), fam.head(cfg, reader, embed),
                         state=State(train="all", tokenizer=src.ref))
