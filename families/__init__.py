"""Model families as data: one module per family, and the registry from config.json's model_type to it.

    family = families.get("llama")           # a Family (compose.families.base)
    family.arch_config(config, where, dtype) # config.json -> the typed ArchConfig
    family.block(config, cfg, i, reader, origin)   # layer i of a checkpoint as an IR DecoderBlock
    family.config_json(graph), family.tensors(graph)  # what the hf backend writes for a graph

Adding a family is one module here (a Family subclass and `FAMILY = ...`), one line in MODULES, and one
entry in tests/test_families.py. No module outside this package names a model_type or a transformers class.
"""
from __future__ import annotations

from compose.errors import SourceError
from compose.families import (composite, compose_moe, gemma2, gemma3, llama, mistral, mixtral, phi3, qwen2,
                              qwen2_moe, qwen3, qwen3_moe)
from compose.families.base import Family, Features, Reader

MODULES = (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3, mixtral, qwen2_moe, qwen3_moe, compose_moe, composite)
REGISTRY: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in MODULES}
SOURCES = tuple(t for t, f in REGISTRY.items() if f is not composite.FAMILY)
"""The model_types compose reads checkpoints of (everything it writes, composites aside)."""
TINY: dict[str, str] = {f.tiny_name or t: t for t, f in REGISTRY.items() if f.tiny_options is not None}
"""The built-in tiny models (`tiny:<name>`): name -> model_type (`gemma3` -> `gemma3_text`)."""
COMPOSITE = composite.FAMILY.model_type
GENERATED_MOE = compose_moe.FAMILY.model_type
"""The target of a mixture of experts that no transformers class holds (generated code)."""


def get(model_type: str) -> Family:
    return REGISTRY[model_type]


def for_source(config: dict, where: str) -> Family:
    """The family that reads config.json `config`, or a SourceError naming what is supported."""
    t = config.get("model_type") if isinstance(config, dict) else None
    if t is None:
        raise SourceError(f"{where}: config.json has no model_type (supported: {', '.join(SOURCES)})")
    if t not in SOURCES:
        raise SourceError(f"{where}: config.json model_type {t!r} is not supported yet (supported: "
                          f"{', '.join(SOURCES)})")
    return REGISTRY[t].source_family(config, where)


def in_memory_name(name: str) -> str:
    """The parameter name a checkpoint tensor has once transformers 5 (or the generated module) loads it:
    stacked experts and Mixtral's `block_sparse_moe` renamed; every other name as it is."""
    for f in REGISTRY.values():
        if (new := f.in_memory_name(name)) is not None:
            return new
    return name


__all__ = ["Family", "Features", "Reader", "REGISTRY", "SOURCES", "TINY", "COMPOSITE", "GENERATED_MOE", "get",
           "for_source", "in_memory_name"]
