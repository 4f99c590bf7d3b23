"""PEFT LoRA adapters as sources: mergekit's `model+adapter` references, folded into the model at load.

An adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`, as PEFT's
`save_pretrained` writes it. It opens like a model source (`lora:<folder>`, headers only, tensors read one
at a time), and `fold` turns each base weight it adapts into a `LowRank` expression (compose.ir.weights):
W + scale * B @ A, computed when that one tensor is written, never a merged copy of the model made first.

What it folds is what PEFT's `merge_and_unload` computes for a plain LoRA adapter:
- scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; r and alpha per module from
  `rank_pattern` / `alpha_pattern` (PEFT's rule: the first pattern that matches the module's name, or a
  dotted tail of it, as a regex);
- LoRA on embeddings (`lora_embedding_A/B`, the product transposed); a saved `base_layer` (PEFT's
  `save_embedding_layers`) replaces the base tensor first;
- `modules_to_save`: the adapter's full copy replaces the base tensor;
- `fan_in_fan_out` is ignored, as PEFT ignores it for `nn.Linear` (every layer compose adapts is one);
- `bias: lora_only`: the trained biases of the adapted layers, saved whole as `<module>.base_layer.bias`,
  replace the base model's.
Anything else that changes the math (DoRA, LoRA biases, layer replication, activated LoRA, ...) is refused
by its field name rather than folded wrongly. An adapter is untrusted input: every shape is checked
against the base weight, the scale must be finite, and its weight file must lie inside its folder.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from compose.errors import SourceError
from compose.ir.weights import Expr, Load, LowRank
from compose.sources import FolderSource, Source, _hub_folder, _read_json, _root

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""PEFT's prefix of every tensor name in an adapter of a causal LM (PeftModel -> LoraModel -> the model)."""

REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA: a magnitude vector rescales each column)",
    "lora_bias": "LoRA biases (a bias on lora_B)",
    "target_parameters": "LoRA on raw parameters (target_parameters, e.g. MoE expert tensors)",
    "layer_replication": "layer replication (it changes the model's layers)",
    "alora_invocation_tokens": "activated LoRA (it applies only after its invocation tokens, so it cannot be folded)",
    "use_qalora": "QA-LoRA",
    "trainable_token_indices": "trainable tokens",
    "megatron_config": "Megatron-parallel LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing over several LoRAs",
    "kasa_config": "KaSA",
    "ensure_weight_tying": "tied adapters on embeddings and head",
}
"""Fields that change what the adapter computes, each refused by name when set."""

IGNORED = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
           "target_modules", "exclude_modules", "lora_dropout", "init_lora_weights", "layers_to_transform",
           "layers_pattern", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
           "runtime_config", "qalora_group_size"}
"""Fields that only say how the adapter was chosen, initialised or trained: the saved tensors are what
they decided (which modules, which layers), so a fold does not need them."""

READ = {"peft_type", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "bias",
        "modules_to_save"}


def open_adapter(ref: str) -> AdapterSource:
    """A LoRA adapter: a local folder, or a hub id through the local Hugging Face cache."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{ref}: not a folder (expected a PEFT adapter folder with {CONFIG})")
        return AdapterSource(path.resolve(), f"lora:{path.resolve()}")
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise SourceError(f"{ref}: no such adapter folder")
    return AdapterSource(_hub_folder(ref), f"lora:{ref}")


class AdapterSource(FolderSource):
    """The tensors of one adapter folder (read as a model folder's are), and how they fold into a base."""

    def __init__(self, folder: Path, ref: str):
        # Not FolderSource.__init__: an adapter has no config.json and exactly one weight file.
        Source.__init__(self)
        self.folder, self.ref, self.config = folder, ref, {}
        self._where, self._meta = {}, {}
        self.settings = _check_config(folder / CONFIG)
        weights = folder / WEIGHTS
        if not os.path.lexists(weights):
            pickled = [f for f in ("adapter_model.bin", "adapter_model.pt") if (folder / f).exists()]
            raise SourceError(f"{folder}: no {WEIGHTS}" + (f" (only pickled {pickled[0]}; compose reads safetensors "
                                                           "only)" if pickled else ""))
        try:
            inside = weights.resolve().is_relative_to(_root(folder))
        except (OSError, RuntimeError) as e:
            raise SourceError(f"{weights}: cannot read ({e})") from None
        if not inside:
            raise SourceError(f"{weights}: a link to {weights.resolve()}, outside the adapter folder")
        self._add(weights)
        self._modules = self._parse_keys(weights)

    def extra_files(self) -> list[Path]:
        return []  # an adapter's tokenizer files are not the base model's

    # -- what the file holds -----------------------------------------------------------------------------

    def _parse_keys(self, weights: Path) -> dict[str, dict[str, str]]:
        """Base tensor name -> {role: adapter key}: roles `A`, `B`, `embed_A`, `embed_B`, `base` (a
        replacement base tensor) and `full` (a modules_to_save copy)."""
        out: dict[str, dict[str, str]] = {}
        saved = self.settings["modules_to_save"]
        suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "embed_A",
                    ".lora_embedding_B": "embed_B", ".base_layer.weight": "base"}
        for key in self._meta:
            if not key.startswith(PREFIX):
                raise SourceError(f"{weights}: tensor {key} is not under {PREFIX!r} (not a PEFT adapter of a causal "
                                  "language model)")
            name = key[len(PREFIX):]
            suffix = next((s for s in suffixes if name.endswith(s)), None)
            if suffix is not None:
                role, target = suffixes[suffix], name[: -len(suffix)] + ".weight"
            elif name.endswith(".base_layer.bias"):
                if self.settings["bias"] != "lora_only":
                    raise SourceError(f"{weights}: tensor {key} is a trained bias, but {CONFIG} says bias "
                                      f"{self.settings['bias']!r} (PEFT writes these with bias: lora_only)")
                role, target = "bias", name.removesuffix(".base_layer.bias") + ".bias"
            elif ".lora_magnitude_vector" in name:
                raise SourceError(f"{weights}: tensor {key} is DoRA's magnitude vector; compose folds plain LoRA only")
            elif ".lora_" in name:
                raise SourceError(f"{weights}: tensor {key} is not a plain LoRA tensor (lora_A/lora_B weights); "
                                  "LoRA biases and other variants are not supported")
            else:
                module = name.rpartition(".")[0]
                if not any(module.endswith(m) for m in saved):
                    raise SourceError(f"{weights}: tensor {key} is neither a LoRA tensor nor in modules_to_save "
                                      f"({saved})")
                role, target = "full", name
            out.setdefault(target, {})[role] = key
        for target, roles in out.items():
            lora = {r for r in roles if r in ("A", "B", "embed_A", "embed_B")}
            if lora and lora not in ({"A", "B"}, {"embed_A", "embed_B"}):
                raise SourceError(f"{weights}: module {target.removesuffix('.weight')} has {sorted(lora)} but not "
                                  "exactly one lora_A and one lora_B")
            if "full" in roles and (lora or "base" in roles):
                raise SourceError(f"{weights}: module {target.removesuffix('.weight')} is both in modules_to_save "
                                  "and LoRA-adapted")
            if "base" in roles and not lora:
                raise SourceError(f"{weights}: {roles['base']} is a base layer without a LoRA")
            if "bias" in roles and not {"A", "B"} <= set(out.get(target.removesuffix(".bias") + ".weight", {})):
                raise SourceError(f"{weights}: {roles['bias']} is the bias of a layer without a LoRA (bias: "
                                  "lora_only trains the biases of the adapted layers only)")
        return out

    # -- the fold ----------------------------------------------------------------------------------------

    def _load(self, key: str) -> Load:
        shape, dtype = self._meta[key]
        return Load(self.ref, key, shape, dtype)

    def fold(self, name: str, base: Expr) -> Expr:
        """Base tensor `name` (its checkpoint name) with this adapter folded in; `base` itself when the
        adapter leaves it alone."""
        roles = self._modules.get(name)
        if roles is None:
            return base
        where = f"{self.folder / WEIGHTS}"
        for role in ("full", "base", "bias"):
            if role in roles:
                new = self._load(roles[role])
                if new.shape != base.shape:
                    raise SourceError(f"{where}: tensor {roles[role]} has shape {list(new.shape)}, but the base "
                                      f"model's {name} is {list(base.shape)}")
                base = new
        if "full" in roles or "bias" in roles:
            return base
        embed = "embed_A" in roles
        a, b = self._load(roles["embed_A" if embed else "A"]), self._load(roles["embed_B" if embed else "B"])
        module = name.removesuffix(".weight")
        r, alpha = self._rank_alpha(module)
        rows, cols = (base.shape[1], base.shape[0]) if embed else base.shape
        if len(base.shape) != 2 or a.shape != (r, cols) or b.shape != (rows, r):
            want = f"A [{r}, {cols}] and B [{rows}, {r}]"
            raise SourceError(f"{where}: module {module} has A {list(a.shape)} and B {list(b.shape)}; for r={r} and "
                              f"the base weight {list(base.shape)} they must be {want}")
        scale = alpha / math.sqrt(r) if self.settings["use_rslora"] else alpha / r
        if not math.isfinite(scale):
            raise SourceError(f"{self.folder / CONFIG}: module {module} has a non-finite scale ({scale})")
        for t in (a, b):
            if t.dtype not in ("float32", "bfloat16", "float16", "float64"):
                raise SourceError(f"{where}: tensor {t.key} is {t.dtype}, not a floating-point type")
        return LowRank(base, a, b, float(scale), transpose=embed)

    def _rank_alpha(self, module: str) -> tuple[int, float]:
        s = self.settings
        return (_pattern(s["rank_pattern"], module, s["r"]), _pattern(s["alpha_pattern"], module, s["lora_alpha"]))

    def changes(self, name: str) -> bool:
        return name in self._modules

    def check_folded(self, folded: set[str], base_ref: str, where: str) -> None:
        """Every module of the adapter went into the model (`folded`: the base tensors read): one the base
        does not have is an adapter for another model, and is refused rather than dropped."""
        missing = sorted(set(self._modules) - folded)
        if missing:
            raise SourceError(f"{where}: adapter {self.folder} adapts {missing[0].removesuffix('.weight')}, which "
                              f"{base_ref} has no tensor {missing[0]} for (an adapter for another model?)")


def _pattern(patterns: dict, module: str, default):
    """PEFT's get_pattern_key: the first pattern (a regex) matching the module's name or a dotted tail."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(path: Path) -> dict:
    """The fields of adapter_config.json compose reads, checked; a SourceError naming the field otherwise."""
    if not os.path.lexists(path):
        raise SourceError(f"{path.parent}: no {CONFIG} (expected a PEFT adapter folder)")
    c = _read_json(path)
    if not isinstance(c, dict):
        raise SourceError(f"{path}: a JSON {type(c).__name__}, not an object")
    if c.get("peft_type") != "LORA":
        raise SourceError(f"{path}: peft_type {c.get('peft_type')!r}; compose folds LoRA adapters only")
    for field, what in REFUSED.items():
        if c.get(field) not in (None, False, [], {}):
            raise SourceError(f"{path}: {field}: {what} is not supported (compose folds plain LoRA adapters)")
    for field, v in c.items():
        if field not in READ and field not in IGNORED and field not in REFUSED and v not in (None, False, [], {}):
            raise SourceError(f"{path}: {field}: a field compose does not know, set to {v!r}; refusing rather than "
                              "folding an adapter it may not compute correctly")
    r = c.get("r", 8)
    if not _positive_int(r):
        raise SourceError(f"{path}: r must be a positive integer, got {r!r}")
    alpha = c.get("lora_alpha", 8)
    if not _finite(alpha):
        raise SourceError(f"{path}: lora_alpha must be a finite number, got {alpha!r}")
    rslora = c.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise SourceError(f"{path}: use_rslora must be true or false, got {rslora!r}")
    if c.get("bias", "none") not in ("none", "lora_only"):
        raise SourceError(f"{path}: bias {c.get('bias')!r}: trained biases of layers without a LoRA are not "
                          "supported (only bias: none or lora_only)")
    if not isinstance(c.get("fan_in_fan_out", False), bool):
        raise SourceError(f"{path}: fan_in_fan_out must be true or false, got {c.get('fan_in_fan_out')!r}")
    patterns = {}
    for field, ok, what in (("rank_pattern", _positive_int, "a positive integer"),
                            ("alpha_pattern", _finite, "a finite number")):
        p = c.get(field) or {}
        if not isinstance(p, dict):
            raise SourceError(f"{path}: {field} must be an object of module pattern -> value, got {p!r}")
        for k, v in p.items():
            if not ok(v):
                raise SourceError(f"{path}: {field}[{k!r}] must be {what}, got {v!r}")
            try:
                re.compile(k)
            except re.error as e:
                raise SourceError(f"{path}: {field}[{k!r}] is not a valid pattern ({e})") from None
        patterns[field] = p
    saved = c.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        raise SourceError(f"{path}: modules_to_save must be a list of module names, got {saved!r}")
    return {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "modules_to_save": saved,
            "bias": c.get("bias", "none"), **patterns}


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
