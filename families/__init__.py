"""Model families as data: one module per family, and the registry from config.json's model_type to it.

    family = families.get("llama")           # a Family (compose.families.base)
    family.arch_config(config, where, dtype) # config.json -> the typed ArchConfig
    family.block(config, cfg, i, reader, origin)   # layer i of a checkpoint as an IR DecoderBlock
    family.config_json(graph), family.tensors(graph)  # what the hf backend writes for a graph

Adding a hand-written family is one module here (a Family subclass and `FAMILY = ...`; MODULES collects it
from the folder) and one entry in tests/test_families.py. Every other model_type transformers can build is
read by a family derived from transformers' own class (compose.families.derived). No module outside this
package names a model_type or a transformers class.
"""
from __future__ import annotations

from compose.errors import SourceError
import importlib
import pkgutil

from compose.families import composite, compose_moe, derived
from compose.families.base import Family, Features, Reader


def _collect() -> tuple:
    """Every module of this package that defines a hand-written family (`FAMILY = ...`), found in the folder:
    adding a family is adding its module. Dense families first, so a dense family precedes its MoE classes."""
    found = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
    mods = [m for m in found if isinstance(getattr(m, "FAMILY", None), Family)]
    return tuple(sorted(mods, key=lambda m: (m.FAMILY.generated, m.FAMILY.expert_prefix is not None, m.__name__)))


MODULES = _collect()
REGISTRY: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in MODULES}
SOURCES = tuple(t for t, f in REGISTRY.items() if f is not composite.FAMILY)
"""The model_types compose reads checkpoints of (everything it writes, composites aside)."""
TINY: dict[str, str] = {f.tiny_name or t: t for t, f in REGISTRY.items() if f.tiny_options is not None}
"""The built-in tiny models (`tiny:<name>`): name -> model_type (`gemma3` -> `gemma3_text`)."""
COMPOSITE = composite.FAMILY.model_type
GENERATED_MOE = compose_moe.FAMILY.model_type
"""The target of a mixture of experts that no transformers class holds (generated code)."""


def get(model_type: str) -> Family:
    """The hand-written family of `model_type`, else the one derived from transformers' class."""
    if model_type in REGISTRY:
        return REGISTRY[model_type]
    return derived.family(model_type)


def for_source(config: dict, where: str) -> Family:
    """The family that reads config.json `config`: its hand-written module, else one derived from transformers'
    own class (compose.families.derived); a SourceError saying why neither can."""
    t = config.get("model_type") if isinstance(config, dict) else None
    if t is None:
        raise SourceError(f"{where}: config.json has no model_type")
    if not isinstance(t, str):
        raise SourceError(f"{where}: config.json model_type {t!r} is not supported (it must be a name)")
    if t in SOURCES:
        return REGISTRY[t].source_family(config, where)
    if t in REGISTRY:  # compose's own outputs that are no source (composites)
        raise SourceError(f"{where}: config.json model_type {t!r} is compose's generated code, which cannot be "
                          "read back as a source yet")
    return derived.family(t).source_family(config, where)


def describe(sources: list[tuple[str, dict]], g=None) -> list[str]:
    """What `compose inspect` says of the families: for each source (reference, config.json), which family read
    it (its module, or what was derived from transformers' class: the decoder stack, the per-layer fields, the
    residual-output projections); for a derived graph `g`, the per-layer fields as its config.json says them."""
    out = []
    for ref, config in sources:
        fam = for_source(config, ref)
        if fam.derived:
            out += [f"family {ref}: {fam.model_type}, " + line if i == 0 else f"  {line}"
                    for i, line in enumerate(derived.derivation(config, ref).describe())]
            if (hand := derived.language_family(config)) is not None:
                out.append(f"  language model: read by the hand-written {hand.model_type} module ({_file(hand)})")
        else:
            out.append(f"family {ref}: {fam.model_type}, hand-written ({_file(fam)}), written as {fam.architecture}")
    if g is not None and g.derived and g.state.target is not None:
        d = derived.of(g)
        config = get(g.config.family).config_json(g)
        text = config[d.text] if d.text else config
        out += [f"rewritten {field} = {text.get(field)!r}" for field, _ in d.fields]
        out.append(f"rewritten num_hidden_layers = {text['num_hidden_layers']}")
    return out


def _file(fam: Family) -> str:
    """The module a hand-written family lives in (`families/gemma3.py`)."""
    return f"families/{type(fam).__module__.rpartition('.')[2]}.py"


def in_memory_name(name: str) -> str:
    """The parameter name a checkpoint tensor has once transformers 5 (or the generated module) loads it:
    stacked experts and Mixtral's `block_sparse_moe` renamed; every other name as it is."""
    for f in REGISTRY.values():
        if (new := f.in_memory_name(name)) is not None:
            return new
    return name


__all__ = ["Family", "Features", "Reader", "REGISTRY", "SOURCES", "TINY", "COMPOSITE", "GENERATED_MOE", "get",
           "for_source", "describe", "in_memory_name"]
