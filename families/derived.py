"""Derived families: any decoder transformers can build, read from transformers' own class.

For a model_type compose has no module for, the class transformers would load the checkpoint as is built on
the meta device from config.json alone (no weights are read, none are allocated), and what a family needs
is read from it:

- every tensor a checkpoint of the class holds, with its shape, under the checkpoint's own names
  (transformers' save-time conversion turns its in-memory names back into them: per-expert tensors,
  `language_model.model.*`);
- the decoder stack (the ModuleList of `get_decoder()`, such as `model.language_model.layers`) and its
  prefix in the checkpoint;
- the per-layer config fields (compose.families.layer_fields) and what each says of each layer;
- each layer's residual-output projections: the tensors whose zeros make it add exactly 0.

The checkpoint's headers are then checked against it: a tensor the class does not have, or one it has
that the checkpoint lacks, is refused by name, so nothing is silently dropped. The output is written as the
same class, its config.json the source's with the layer count and per-layer fields rewritten, and checked
the same way before anything is written: the class built from the new config.json must hold exactly the
tensors written, and give each layer what its source layer had.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from compose.errors import BuildError, SourceError
from compose.families import layer_fields
from compose.families.base import FILE_KEYS, Family, Parts, Shape, file_fields
from compose.ir.config import ArchConfig, Rope
from compose.ir.graph import Graph
from compose.ir.nodes import Layer, Origin, Tensors

OUTPUT_PROJECTIONS = frozenset({"o_proj", "down_proj", "out_proj", "dense", "c_proj", "wo", "w2", "dense_4h_to_h",
                                "fc2", "o", "proj_out"})
"""Module names of the linear layers whose outputs join the residual stream in transformers' decoder layers
(attention outputs, MLP and expert down projections, linear attention's out_proj)."""

Named = tuple[tuple[str, Shape], ...]


@dataclass(frozen=True)
class Derivation:
    """What compose reads of one config.json from transformers' class."""

    model_type: str
    architecture: str
    text: str
    """Where the decoder's config sits in config.json: `` (the top) or a sub-config's key (`text_config`)."""
    stack: str
    """The decoder stack in memory (`model.language_model.layers`)."""
    saved_stack: str
    """The decoder stack's prefix in the checkpoint (`language_model.model.layers`)."""
    stem: Named
    layers: tuple[Named, ...]
    """Per layer: its tensors, named below `saved_stack.i.`."""
    tail: Named
    fields: tuple[tuple[str, str], ...]
    """(field, kind) of the decoder config's per-layer fields."""
    values: tuple[tuple[tuple[str, str], ...], ...]
    """Per layer: (field, what it says of the layer, as JSON text)."""
    zero: tuple[tuple[str, ...], ...]
    """Per layer: its residual-output projections (names below `saved_stack.i.`)."""
    fp32: tuple[tuple[str, str], ...]
    """(half dtype, pattern): the tensors transformers' class keeps in float32 when the model is in that dtype
    (its _keep_in_fp32_modules for float16, _keep_in_fp32_modules_strict for both), as transformers matches
    them (a regex search of the names)."""
    towers: tuple[tuple[str, int], ...]
    """(checkpoint prefix, layer count) of the other stacks of layers (a vision tower's blocks): a merge's
    gradient parameters run over each of them as over the decoder's, as mergekit's modules do."""
    unknown: tuple[str, ...]
    """Decoder-config fields about layers that compose cannot follow through a new layer order."""

    def names(self) -> dict[str, Shape]:
        """Every checkpoint tensor and its shape."""
        out = dict(self.stem)
        for i, layer in enumerate(self.layers):
            out.update({f"{self.saved_stack}.{i}.{k}": s for k, s in layer})
        out.update(self.tail)
        return out

    def position(self, name: str) -> float:
        """Where tensor `name` outside the decoder stack sits for a merge's gradients (mergekit's t): i / (L - 1)
        for layer i of another stack of L layers (1 for a stack of one), else 0 (embeddings, norms, heads)."""
        for prefix, count in self.towers:
            m = re.match(rf"{re.escape(prefix)}\.(\d+)\.", name)
            if m:
                return int(m[1]) / (count - 1) if count > 1 else 1.0
        return 0.0

    def describe(self) -> list[str]:
        """What `compose inspect` shows of the derivation."""
        n = len(self.layers)
        out = [f"derived from transformers' {self.architecture}: decoder stack {self.stack} ({n} layers; "
               f"{self.saved_stack}.* in the checkpoint), {len(self.stem)} tensors before it, {len(self.tail)} after"]
        if self.fields:
            out.append("per-layer fields: " + ", ".join(f"{f} ({kind})" for f, kind in self.fields))
        if self.unknown:
            out.append("fields about layers compose cannot follow: " + ", ".join(self.unknown))
        zero = sorted({k for z in self.zero for k in z})
        out.append("residual-output projections: " + (", ".join(zero) or "none"))
        return out


def is_output_projection(name: str) -> bool:
    """Whether tensor `name` (below a layer) belongs to a linear layer whose output joins the residual stream:
    one of its module names is an output projection (`self_attn.o_proj.weight`, `mlp.experts.3.down_proj.weight`),
    or it is a stacked expert tensor of one (`mlp.experts.down_proj`, `mlp.experts.down_proj_bias`)."""
    parts = name.split(".")
    if any(p in OUTPUT_PROJECTIONS for p in parts[:-1]):
        return True
    return re.sub(r"_(bias|blocks|scales)$", "", parts[-1]) in OUTPUT_PROJECTIONS and len(parts) > 1


def derivation(config: dict, where: str) -> Derivation:
    """The derivation of config.json `config`, or a SourceError naming `where` and why transformers cannot build
    it. Cached by the config's text: one build derives each source once."""
    got = _derive(json.dumps(config, sort_keys=True))
    if isinstance(got, str):
        raise SourceError(f"{where}: {got}")
    return got


def of(g: Graph) -> Derivation:
    """The derivation a derived graph's config records (its first source's). The config holds config.json as
    `derivation` keys its cache (sorted JSON), so this is a lookup: backends ask it once per tensor."""
    got = _derive(g.config.source)
    if isinstance(got, str):
        raise SourceError(f"{g.config.family}: {got}")
    return got


def known(model_type: str) -> bool:
    """Whether transformers knows `model_type` (its own code, never a checkpoint's)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def image_text_to_text(architecture: str) -> bool:
    """Whether transformers' `architecture` is an image-text-to-text class (AutoModelForImageTextToText's)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return architecture in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(e).__name__


def class_name(config: dict) -> str | None:
    """The transformers class a config.json is read as: the one its `architectures` names, if transformers maps
    the model_type to it as a causal LM or an image-text-to-text model, else the causal LM class, else the
    image-text-to-text one."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    t = config.get("model_type")
    names = [m.get(t) for m in (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)]
    # A class of the model_type's own config (Qwen3.5's causal LM class is its text model's, under `qwen3_5`).
    names = [n for n in names if isinstance(n, str) and getattr(getattr(transformers, n, None), "config_class", None)
             is CONFIG_MAPPING[t]]
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and archs[0] in names:
        return archs[0]
    return names[0] if names else None


def build_config(config: dict):
    """transformers' own config object for config.json `config` (its class checks it); a ValueError quoting
    transformers' reason when the class rejects it."""
    import logging

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[config["model_type"]]
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        return cls.from_dict({k: v for k, v in config.items() if k != "auto_map"})
    except Exception as e:  # transformers raises ValueError, TypeError and its own validation errors
        raise ValueError(f"transformers' {cls.__name__} rejects config.json: {_one_line(e)}") from None
    finally:
        logging.getLogger("transformers").setLevel(level)


def build_meta(config: dict):
    """(the class's model built on the meta device, its config object) for config.json `config`."""
    import torch
    import transformers

    cfg = build_config(config)
    name = class_name(config)
    cls = getattr(transformers, name)
    try:
        with torch.device("meta"):
            model = cls._from_config(cfg)
    except Exception as e:
        raise ValueError(f"transformers' {name} cannot be built from config.json: {_one_line(e)}") from None
    return model, cfg


MAX_LAYERS, MAX_COUNT = 1024, 1 << 16
"""The most layers (of the decoder, of a vision tower) and the most of anything else counted in modules
(experts, heads) a config.json may ask for before transformers' class is built from it: real models stay
far below (Llama 3.1 405B: 126 layers; DeepSeek-V3: 256 experts), and a billion layers would hang even on
the meta device."""
_LAYERS = re.compile(r"(layers|layer|^depth)$")
_COUNTS = re.compile(r"(experts|heads|head)$")
"""The config.json keys that count modules: `num_hidden_layers`, `n_layer`, `depth`; `n_routed_experts`, ..."""


def _too_many(config, path: str = "") -> str | None:
    """The first count in config.json (nested configs included) above its bound, as a reason."""
    for k, v in config.items() if isinstance(config, dict) else ():
        where = f"{path}.{k}" if path else k
        if isinstance(v, dict):
            if (why := _too_many(v, where)) is not None:
                return why
        elif isinstance(v, int) and not isinstance(v, bool):
            most = MAX_LAYERS if _LAYERS.search(k) else MAX_COUNT if _COUNTS.search(k) else None
            if most is not None and v > most:
                return f"config.json {where} is {v:,}, more than compose builds a model with ({most:,})"
    return None


@functools.lru_cache(maxsize=64)
def _derive(text: str) -> Derivation | str:
    config = json.loads(text)
    if (why := _too_many(config)) is not None:
        return why
    t = config.get("model_type")
    if not isinstance(t, str) or not known(t):
        return (f"config.json model_type {t!r} is not one transformers {file_fields('')['transformers_version']} "
                "knows (compose never runs a checkpoint's own code: trust_remote_code is not an option)")
    if config.get("quantization_config") is not None:
        return "a quantized checkpoint (quantization_config); compose reads float weights"
    name = class_name(config)
    if name is None:
        return f"transformers has no causal language model or image-text-to-text class for model_type {t!r}"
    try:
        model, cfg = build_meta(config)
    except ValueError as e:
        return str(e)
    text_cfg = cfg.get_text_config(decoder=True)
    text_key = "" if text_cfg is cfg else next((k for k in config if getattr(cfg, k, None) is text_cfg), None)
    n = getattr(text_cfg, "num_hidden_layers", None)
    if text_key is None or not isinstance(n, int) or n < 1:
        return f"transformers' {name}: found no decoder config with num_hidden_layers"
    stack = _stack(model, n)
    if stack is None:
        return f"transformers' {name}: found no decoder stack of {n} layers"
    return _read(model, t, name, text_key, stack, text_cfg, n)


def _stack(model, n: int) -> str | None:
    """The in-memory path of the decoder stack: the ModuleList of n layers in `get_decoder()`, else the
    largest ModuleList of n layers."""
    import torch

    paths = {id(m): p for p, m in model.named_modules()}
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    try:
        decoder = model.get_decoder()
    except Exception:  # a class without a rule of its own for it
        decoder = None
    if decoder is not None and id(decoder) in paths:
        inside = [(p, m) for p, m in lists if p.startswith(paths[id(decoder)] + ".") or paths[id(decoder)] == ""]
        lists = inside or lists
    if not lists:
        return None
    return max(lists, key=lambda pm: sum(x.numel() for x in pm[1].parameters()))[0]


def _saved(model, tensors: dict) -> dict:
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


def _read(model, t: str, name: str, text_key: str, stack: str, text_cfg, n: int) -> Derivation | str:
    every, once = dict(model.named_parameters(remove_duplicate=False)), dict(model.named_parameters())
    tensors = {k: v for k, v in model.state_dict(keep_vars=True).items()
               if k in once or k not in every}  # one of each tied set, and the buffers a checkpoint holds
    try:
        saved = _saved(model, tensors)
    except Exception as e:
        return f"transformers' {name}: its save-time renaming failed on the meta device: {_one_line(e)}"
    order = list(tensors)
    inside = [i for i, k in enumerate(order) if k.startswith(stack + ".")]
    if not inside:
        return f"transformers' {name}: its decoder stack {stack} holds no tensors"
    saved_stack = _saved_prefix(model, tensors, stack)
    if saved_stack is None:
        return f"transformers' {name}: could not tell where its decoder stack {stack} sits in a checkpoint"
    after = {k: tensors[k] for k in order[inside[-1] + 1:]}
    tail_names = set(_saved(model, after)) if after else set()
    pattern = re.compile(rf"{re.escape(saved_stack)}\.(\d+)\.(.+)")
    layers: list[dict[str, Shape]] = [{} for _ in range(n)]
    stem, tail = {}, {}
    for k, v in saved.items():
        m = pattern.fullmatch(k)
        if m and int(m[1]) < n:
            layers[int(m[1])][m[2]] = tuple(v.shape)
        else:
            (tail if k in tail_names else stem)[k] = tuple(v.shape)
    # The residual-output projections by their in-memory names, renamed as the checkpoint names them (Granite's
    # stacked `experts.down_proj` is `output_linear` on disk; per-expert tensors are one each).
    zero: list[set[str]] = [set() for _ in range(n)]
    outputs = {k: v for k, v in tensors.items() if k.startswith(stack + ".") and is_output_projection(k)}
    for k in (_saved(model, outputs) if outputs else {}):
        m = pattern.fullmatch(k)
        if m and int(m[1]) < n:
            zero[int(m[1])].add(m[2])
    towers = _towers(model, tensors, stack)
    cfg_values = text_cfg.to_dict()
    fields, unknown = layer_fields.find(cfg_values, n)
    whole = model.config.to_dict()
    fields += layer_fields.find_outer(whole)
    return Derivation(
        model_type=t, architecture=name, text=text_key, stack=stack, saved_stack=saved_stack,
        stem=tuple(stem.items()), layers=tuple(tuple(x.items()) for x in layers), tail=tuple(tail.items()),
        fields=fields, values=layer_fields.values(cfg_values, fields, n, whole),
        zero=tuple(tuple(k for k in x if k in z) for x, z in zip(layers, zero)), unknown=unknown, towers=towers,
        fp32=_fp32(model))


def in_memory_names(config: dict, where: str) -> dict[str, str]:
    """In-memory name -> checkpoint name of every tensor the class holds under another name than a checkpoint
    stores it by (an image-text-to-text class's `model.language_model.*`): what a PEFT adapter, which names
    modules as they are in memory, is matched by. Found by transformers' own load-time renaming of each
    checkpoint name; computed only when an adapter asks (it renames every name)."""
    derivation(config, where)
    return dict(_in_memory(json.dumps(config, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _in_memory(text: str) -> tuple[tuple[str, str], ...]:
    config = json.loads(text)
    model, _ = build_meta(config)
    loaded = _loader_names(model, list(derivation(config, "").names()))
    return tuple((new, k) for k, new in loaded.items() if new != k)


def _loader_names(model, keys: list[str]) -> dict[str, str]:
    """Checkpoint name -> the in-memory name transformers' loader gives it, for each of `keys` that a plain
    renaming maps onto a tensor of `model` (a converter's parts, such as per-expert tensors, are left out)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model, add_legacy=True)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict(keep_vars=True)
    out = {}
    for k in keys:
        new, converted = rename_source_key(k, renamings, converters, model.base_model_prefix, meta)
        if converted is None and new in meta:
            out[k] = new
    return out


def _fp32(model) -> tuple[tuple[str, str], ...]:
    """transformers' own rule (PreTrainedModel._get_dtype_plan and build_glob_alternation) as patterns."""
    import torch
    from transformers.core_model_loading import build_glob_alternation

    out = []
    for dtype, torch_dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        plan = model._get_dtype_plan(torch_dtype)
        if plan:
            out.append((dtype, build_glob_alternation(list(plan))[0].pattern))
    return tuple(out)


def _towers(model, tensors: dict, stack: str) -> tuple[tuple[str, int], ...]:
    """The other stacks of layers: ModuleLists (outside the decoder stack) as long as a sub-config says its
    model is deep (`depth`, `num_hidden_layers`), each with its checkpoint prefix."""
    import torch

    depths = {v for sub in (getattr(model.config, k, None) for k in getattr(model.config, "sub_configs", {}))
              if sub is not None for key in ("depth", "num_hidden_layers", "num_layers")
              if isinstance(v := getattr(sub, key, None), int) and v > 0}
    out = []
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and path != stack and len(m) in depths:
            if (prefix := _saved_prefix(model, tensors, path)) is not None:
                out.append((prefix, len(m)))
    return tuple(out)


def _saved_prefix(model, tensors: dict, path: str) -> str | None:
    """Where the stack of layers at in-memory `path` sits in a checkpoint: the prefix that transformers' save
    renaming gives a tensor of its layer 0 renamed alone, one to one (a tensor that a converter merges with
    others, such as an expert's, is passed over)."""
    for k in tensors:
        if k.startswith(f"{path}.0."):
            rest = k[len(path) + 3:]
            one = list(_saved(model, {k: tensors[k]}))
            if len(one) == 1 and one[0].endswith(".0." + rest):
                return one[0][:-len(".0." + rest)]
    return None


def aliases(config: dict, keys: list[str], where: str) -> dict[str, str]:
    """Checkpoint name -> the name transformers' own save layout gives that tensor, for the names of another
    layout transformers also loads (the Hub's Gemma 3 and LLaVA: `vision_tower.vision_model.*`; checkpoints
    saved by transformers 4.5x: `model.language_model.*`). Found by transformers' load-time renaming to its
    in-memory name, then its save-time renaming back. Empty for a checkpoint in the save layout."""
    want = derivation(config, where).names()
    odd = tuple(k for k in keys if k not in want)
    return dict(_aliases(json.dumps(config, sort_keys=True), odd)) if odd else {}


@functools.lru_cache(maxsize=16)
def _aliases(text: str, odd: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    model, _ = build_meta(json.loads(text))
    meta = model.state_dict(keep_vars=True)
    out = []
    for k, new in _loader_names(model, list(odd)).items():
        saved = list(_saved(model, {new: meta[new]}))  # and back, as transformers saves it
        if len(saved) == 1 and saved[0] != k:
            out.append((k, saved[0]))
    return tuple(out)


def check_checkpoint(d: Derivation, shapes: dict[str, Shape], where: str) -> None:
    """Every tensor of the checkpoint (`shapes`: name -> shape, from its headers, under the save layout's names:
    `aliases`) is one the class has, with its shape, and the reverse; else a SourceError naming the first
    that is not."""
    want = d.names()
    extra = [k for k in shapes if k not in want]
    if extra:
        raise SourceError(f"{where}: tensor {extra[0]} is not one transformers' {d.architecture} has "
                          f"({len(extra)} such tensors; compose drops nothing silently)")
    missing = [k for k in want if k not in shapes]
    if missing:
        raise SourceError(f"{where}: no tensor {missing[0]}, which transformers' {d.architecture} has "
                          f"({len(missing)} missing)")
    for k, s in want.items():
        if tuple(shapes[k]) != tuple(s):
            raise SourceError(f"{where}: tensor {k} has shape {list(shapes[k])}, but transformers' {d.architecture} "
                              f"built from config.json has {list(s)}")


def text_part(config: dict, d: Derivation) -> dict:
    return config[d.text] if d.text else config


class Derived(Family):
    """A family read from transformers' class (one per model_type): what compose can do without a hand-written
    module is carry, copy, slice, stack and merge its tensors, and zero its residual-output projections."""

    derived = True

    def __init__(self, model_type: str, architecture: str):
        self.model_type = self.dense = model_type
        self.architecture = architecture

    def source_family(self, c: dict, where: str) -> Family:
        derivation(c, where)
        return self

    def stored_dtype(self, c: dict) -> str | None:
        d = derivation(c, c.get("model_type"))
        return c.get("dtype") or c.get("torch_dtype") or text_part(c, d).get("dtype") or None

    def arch_config(self, c: dict, where: str, dtype: str) -> ArchConfig:
        d = derivation(c, where)
        text = text_part(c, d)

        def number(key: str) -> int:
            v = text.get(key)
            return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0

        tied = not any(k.endswith("lm_head.weight") for k, _ in d.tail + d.stem)
        return ArchConfig(family=self.model_type, vocab=number("vocab_size"), hidden=number("hidden_size"),
                          intermediate=number("intermediate_size"), heads=number("num_attention_heads"),
                          kv_heads=number("num_key_value_heads"), head_dim=number("head_dim"), rms_eps=0.0,
                          rope=Rope(), max_positions=number("max_position_embeddings"), tie_embeddings=tied,
                          qkv_bias=False, o_bias=False, mlp_bias=False, act="", dtype=dtype,
                          source=json.dumps(c, sort_keys=True))

    def read(self, c: dict, reader, where: str, names: dict[str, str]) -> tuple[Tensors, list[Layer], Tensors]:
        """The stem, layers and tail of a checkpoint of config.json `c`, every tensor loaded through `reader`;
        `names` (`aliases`) says which checkpoint name holds a tensor the save layout names otherwise."""
        d = derivation(c, where)
        stored = {v: k for k, v in names.items()}

        def load(named: Named, prefix: str = ""):
            return tuple((k, reader.load(stored.get(prefix + k, prefix + k), s)) for k, s in named)

        hand = language_family(c)
        if hand is not None:
            layers = _read_by(hand, c, d, _Renamed(reader, d, stored), where)
        else:
            layers = [Layer(weights=load(d.layers[i], f"{d.saved_stack}.{i}."), shapes=d.layers[i],
                            origin=Origin(where, i), fields=d.values[i], zero=d.zero[i])
                      for i in range(len(d.layers))]
        return (Tensors(weights=load(d.stem), part="stem", shapes=d.stem), layers,
                Tensors(weights=load(d.tail), part="tail", shapes=d.tail))

    def checkpoint_shapes(self, c: dict, where: str) -> dict[str, Shape]:
        return derivation(c, where).names()

    def class_name(self, g: Graph) -> str:
        return of(g).architecture

    def tensor_dtype(self, g: Graph, name: str) -> str:
        """float32 for what transformers' class keeps in float32 in a half model, else the model's dtype. The
        patterns are matched against the checkpoint's names (transformers matches its in-memory ones: the same
        for every tensor such a rule names in transformers 5.25's classes: router weights and biases, norms)."""
        dtype = g.config.dtype
        return "float32" if any(d == dtype and re.search(p, name) for d, p in of(g).fp32) else dtype

    # -- IR -> checkpoint --------------------------------------------------------------------------------
    def tensors(self, g: Graph) -> Parts:
        d = of(g)
        out: Parts = [(bool(g.embedding.trainable), g.embedding.params())]
        out += [(bool(b.trainable), {f"{d.saved_stack}.{i}.{k}": e for k, e in b.params().items()})
                for i, (_, b) in enumerate(g.blocks())]
        return out + [(bool(g.tail.trainable), g.tail.params())]

    def config_json(self, g: Graph) -> dict:
        """The source's config.json with the layer count, each per-layer field and the dtype rewritten for
        `g`'s layers; a BuildError naming a field that cannot say the new order."""
        d = of(g)
        out = {k: v for k, v in json.loads(g.config.source).items() if k not in FILE_KEYS}
        text = text_part(out, d)
        blocks = [b for _, b in g.blocks()]
        if d.unknown and not _same_layers(blocks, len(d.layers)):
            raise BuildError(f"config.json {d.unknown[0]} is about layers, and compose does not know how it follows "
                             f"a new layer order in {d.architecture}: layers can be merged, not moved")
        text["num_hidden_layers"] = len(blocks)
        source_steps = layer_fields.steps_said(text, d.fields, len(d.layers))
        for field, kind in d.fields:
            if kind == "step" and field not in source_steps:
                continue
            if kind == "step":
                said = [source_steps[field][b.origin.layer] if not b.origin.method else
                        source_steps[field][b.origin.parts[0].layer] for b in blocks]
            else:
                said = [json.loads(dict(b.fields)[field]) for b in blocks]
            where = out if "." in field else text
            try:
                new = layer_fields.rewrite(field, kind, layer_fields.get(where, field), said)
            except ValueError as e:
                raise BuildError(str(e)) from None
            if "." not in field:  # a field outside the decoder config is only checked, never rewritten
                text[field] = new
        if d.text:
            text.update({k: v for k, v in file_fields(g.config.dtype).items() if k != "transformers_version"})
        out.update(architectures=[d.architecture], model_type=d.model_type, **file_fields(g.config.dtype))
        if "num_hidden_layers" in json.loads(g.config.source) and not d.text:
            out["num_hidden_layers"] = len(blocks)
        return out

    def refuse(self, g: Graph) -> str | None:
        """Why the class cannot hold `g` as it is: a per-layer field that cannot say the new order, a tensor
        the class built from the new config.json does not have (or lacks), or a layer that the new config.json
        makes different from its source layer."""
        if not g.derived:
            return f"{self.architecture} is a derived family; only its own checkpoints' layers fit it"
        try:
            config = self.config_json(g)
            out = _derive(json.dumps(config, sort_keys=True))
        except BuildError as e:
            return str(e)
        if isinstance(out, str):
            return out
        want = out.names()
        written = {k: tuple(e.shape) for _, named in self.tensors(g) for k, e in named.items()}
        for k, s in written.items():
            if want.get(k) != s:
                return (f"tensor {k} of shape {list(s)} is not one the new config.json's {out.architecture} has"
                        + (f" (it has {list(want[k])})" if k in want else ""))
        missing = [k for k in want if k not in written]
        if missing:
            return f"the new config.json's {out.architecture} has tensor {missing[0]}, which this model lacks"
        blocks = [b for _, b in g.blocks()]
        for j, b in enumerate(blocks):
            now = dict(out.values[j])
            for field, v in b.fields:
                if now.get(field) != v:
                    layers = [i for i, x in enumerate(blocks)
                              if dict(out.values[i]).get(field) != dict(x.fields).get(field)]
                    return (f"config.json {field} cannot say the new layer order: layers {layers} would be "
                            f"{[json.loads(dict(out.values[i])[field]) for i in layers]}, not what their source "
                            "layers are")
        return None

    def readable_keys(self) -> frozenset[str]:
        return frozenset()


def language_family(config: dict) -> Family | None:
    """The hand-written family of an image-text-to-text class's language model (Gemma 3's `gemma3_text`,
    LLaVA's `llama`), when compose has one for a dense decoder; None otherwise (and for text classes)."""
    from compose import families

    d = derivation(config, config.get("model_type"))
    if not d.text or not isinstance(config.get(d.text), dict):
        return None
    t = config[d.text].get("model_type")
    hand = families.REGISTRY.get(t) if t in families.SOURCES else None
    return hand if hand is not None and hand.expert_prefix is None and not hand.generated else None


class _Renamed:
    """A Reader for a hand-written family reading a language model inside an image-text-to-text checkpoint: its
    `model.layers.i.*` are the class's decoder stack (`language_model.model.layers.i.*`), under the names the
    checkpoint stores them by."""

    def __init__(self, reader, d: Derivation, stored: dict[str, str]):
        self.reader, self.d, self.stored = reader, d, stored

    def _name(self, key: str) -> str:
        if key.startswith("model.layers."):
            key = f"{self.d.saved_stack}.{key[len('model.layers.'):]}"
        return self.stored.get(key, key)

    def has(self, key: str) -> bool:
        return self.reader.has(self._name(key))

    def load(self, key: str, shape):
        return self.reader.load(self._name(key), shape)


def _read_by(hand: Family, config: dict, d: Derivation, reader, where: str) -> list[Layer]:
    """The decoder layers as the hand-written family `hand` reads them (its typed config checks, its names and
    shapes, its residual-output projections), each checked against what the class has."""
    text = build_config(config).get_text_config(decoder=True).to_dict()
    cfg = hand.arch_config(text, where, "float32")
    out = []
    for i, want in enumerate(d.layers):
        block = hand.block(text, cfg, i, reader, Origin(where, i))
        got = {k: tuple(e.shape) for k, e in block.params().items()}
        if got != dict(want):
            diff = sorted(set(got) ^ set(dict(want))) or [k for k in got if got[k] != dict(want)[k]]
            raise SourceError(f"{where}: the {hand.model_type} module reads layer {i} of its language model "
                              f"otherwise than transformers' {d.architecture} holds it ({diff[0]})")
        out.append(Layer(weights=tuple(block.params().items()), shapes=want, origin=block.origin,
                         fields=d.values[i], zero=block.residual_outputs(), family=hand.model_type))
    return out


def _same_layers(blocks, n: int) -> bool:
    """Whether `blocks` are the source's n layers in their order (each one, or a merge of the same layer)."""
    layers = [[b.origin] if b.origin.method is None else list(b.origin.parts) for b in blocks]
    return len(blocks) == n and all(not o.new and o.layer == j for j, os in enumerate(layers) for o in os)


@functools.cache
def family(model_type: str) -> Derived:
    """The derived family of `model_type` (one object per model_type)."""
    return Derived(model_type, class_name({"model_type": model_type}) or model_type)


SMALL = 50_000_000
"""The most parameters the identity check builds a random instance with."""
NARROW = {"intermediate_size": 64, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}
"""Widths the identity check narrows a large config's to."""


def narrowed(config: dict, d: Derivation, layer: int) -> dict:
    """config.json cut down for the identity check of `layer`: the layers up to it (each per-layer field cut to
    them), one key/value head and its group of query heads of the same head size, narrow MLPs and experts, a
    small vocabulary. What makes the layer an identity (its kind, its head size, its rope) is kept."""
    config = json.loads(json.dumps(config))
    part = config[d.text] if d.text else config
    kinds = dict(d.fields)
    if "suffix" not in kinds.values():  # counted from the end: cutting the stack would change them
        n = layer + 1
        part["num_hidden_layers"] = n
        for field, kind in d.fields:
            v = part.get(field)
            if kind == "list" and isinstance(v, list):
                part[field] = v[:n]
            elif kind == "indices" and isinstance(v, list):
                part[field] = [i for i in v if i < n]
            elif kind == "prefix" and isinstance(v, int):
                part[field] = min(v, n)
    part.update({k: v for k, v in NARROW.items() if isinstance(part.get(k), int)})
    heads, kv, hidden = part.get("num_attention_heads"), part.get("num_key_value_heads"), part.get("hidden_size")
    if all(isinstance(x, int) and x > 0 for x in (heads, kv, hidden)) and heads % kv == 0:
        head_dim = part.get("head_dim") or hidden // heads
        group = heads // kv
        part.update(num_attention_heads=group, num_key_value_heads=1)
        part["hidden_size"] = group * head_dim if hidden == heads * head_dim else min(hidden, 256)
    if isinstance(part.get("vocab_size"), int) and part["vocab_size"] > 512:
        part["vocab_size"] = 512
        for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
            for c in (config, part):
                if isinstance(c.get(k), int) and c[k] >= 512:
                    c[k] = None
    return config


def check_identity(config: dict, layer: int, where: str) -> None:
    """That zeroing layer `layer`'s residual-output projections makes it add exactly 0, checked on a small random
    instance of the same class (the config's widths cut down where it is large): the hidden states leaving the
    layer equal those entering it, bit for bit. A BuildError naming the layer otherwise."""
    _identity(json.dumps(config, sort_keys=True), layer, where)


@functools.lru_cache(maxsize=256)
def _identity(text: str, layer: int, where: str) -> None:
    import torch

    config = json.loads(text)
    d = derivation(config, where)
    model = _small_instance(config, d, layer, where)
    layers = model.get_submodule(d.stack.split(".")[-1] if d.text else d.stack)
    block = layers[layer]
    seen = {}

    def before(_, args, kwargs):
        seen["in"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).clone()

    def after(_, args, kwargs, out):
        seen["out"] = out[0] if isinstance(out, tuple) else out

    with torch.no_grad():
        for k, p in block.named_parameters():
            if is_output_projection(k):
                p.zero_()
        hooks = [block.register_forward_pre_hook(before, with_kwargs=True),
                 block.register_forward_hook(after, with_kwargs=True)]
        ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(0))
        try:
            model(input_ids=ids)
        finally:
            for h in hooks:
                h.remove()
    if "out" not in seen or not torch.equal(seen["in"], seen["out"]):
        raise BuildError(f"{where}: zeroing its residual-output projections "
                         f"({', '.join(d.zero[layer]) or 'none found'}) does not make it an exact identity in "
                         f"transformers' {d.architecture}, so expand_blocks cannot add a copy of it")


def _small_instance(config: dict, d: Derivation, layer: int, where: str):
    """A random float32 instance of the class (the language model alone, for an image-text-to-text class),
    narrowed (NARROW) when the config's is larger than SMALL."""
    import torch
    import transformers

    def make(c: dict):
        if d.text:  # the decoder alone: the same layers, and no vision tower to build
            sub = build_config(config).get_text_config(decoder=True)
            return transformers.AutoModel.from_config(type(sub).from_dict(c[d.text]))
        cfg = build_config(c)
        return getattr(transformers, d.architecture)._from_config(cfg)

    def size(c: dict) -> int:
        try:
            with torch.device("meta"):
                return sum(p.numel() for p in make(c).parameters())
        except Exception as e:
            raise BuildError(f"{where}: compose checks a new block's identity on a small random instance of "
                             f"{d.architecture}, which transformers could not build: {_one_line(e)}") from None

    if size(config) > SMALL:
        config = narrowed(config, d, layer)
        if size(config) > SMALL:
            raise BuildError(f"{where}: compose checks a new block's identity on a small random instance of "
                             f"{d.architecture}, and this config's is still over {SMALL:,} parameters narrowed")
    torch.manual_seed(0)
    try:
        model = make(config).float().eval()
    except Exception as e:  # transformers refusing the narrowed config: said in one line, not a traceback
        raise BuildError(f"{where}: compose checks a new block's identity on a small random instance of "
                         f"{d.architecture}, which transformers could not build: {_one_line(e)}") from None
    with torch.no_grad():  # transformers' init leaves some projections at zero: nothing may be zero by chance
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


__all__ = ["Derivation", "Derived", "derivation", "of", "known", "family", "check_checkpoint", "check_identity",
           "is_output_projection", "OUTPUT_PROJECTIONS"]
