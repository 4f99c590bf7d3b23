"""PEFT LoRA adapters as sources: mergekit's `model+adapter` references, folded into the model at load.

An adapter is a folder with `adapter_config.json` and `adapter_model.safetensors`, as PEFT's
`save_pretrained` writes it. It opens like a model source (`lora:<folder>`, headers only, tensors read one
at a time), and `fold` turns each base weight it adapts into a `LowRank` expression (compose.ir.weights):
W + scale * B @ A, computed when that one tensor is written, never a merged copy of the model made first.

What it folds is what PEFT's `merge_and_unload` computes for a plain LoRA adapter:
- scale = lora_alpha / r, or lora_alpha / sqrt(r) with `use_rslora`; r and alpha per module from
  `rank_pattern` / `alpha_pattern` (PEFT's rule: the first pattern that matches the module's name, or a
  dotted tail of it, as a regex; matched at bounded cost, see ModulePatterns);
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
from typing import Callable, Iterable

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
        """PEFT's r and alpha of `module`: the value of the first rank_pattern (alpha_pattern) key that
        matches it, else r (lora_alpha)."""
        out = []
        for field, default in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
            patterns, values = self.settings[field]
            k = patterns.first(module)
            out.append(self.settings[default] if k is None else values[k])
        return out[0], out[1]

    def renamed(self, names: dict[str, str]) -> "AdapterSource":
        """This adapter with its modules under other names (`names`: the name PEFT saw in memory -> the base
        checkpoint's, for a class that stores tensors otherwise than it holds them)."""
        import copy

        out = copy.copy(self)
        out._modules = {names.get(k, k): v for k, v in self._modules.items()}
        return out

    def changes(self, name: str) -> bool:
        return name in self._modules

    def check_folded(self, folded: set[str], base_ref: str, where: str) -> None:
        """Every module of the adapter went into the model (`folded`: the base tensors read): one the base
        does not have is an adapter for another model, and is refused rather than dropped."""
        missing = sorted(set(self._modules) - folded)
        if missing:
            raise SourceError(f"{where}: adapter {self.folder} adapts {missing[0].removesuffix('.weight')}, which "
                              f"{base_ref} has no tensor {missing[0]} for (an adapter for another model?)")


try:  # re's own parser, so the cost bounded is that of the pattern re runs (private since Python 3.11)
    from re import _constants as _sre, _parser as _sre_parse
except ImportError:  # Python 3.10
    import sre_constants as _sre, sre_parse as _sre_parse

PATTERN_CHARS = 1024
"""The longest module-name regex compose takes (PEFT's keys are module names: tens of characters)."""
PATTERNS = 16384
"""The most patterns in one set (an adapter with one per module has a few thousand for the largest models)."""
MATCH_STEPS = 10**9
"""What matching one set of patterns against a model's module names may cost in all, in steps of Python's
regex engine (an upper bound, see ModulePatterns): seconds at worst."""
_CAP = MATCH_STEPS + 1


class ModulePatterns:
    r"""Regexes from untrusted input (an adapter's rank_pattern and alpha_pattern keys, extract-lora's
    --include-regex and --exclude-regex), matched against module names as Python's re matches them, at
    bounded cost.

    re backtracks: `(a+)+$` takes time exponential in the name's length, and only a signal to the main
    thread interrupts it (so no timeout works for a build run from any thread). So before each match
    compose bounds what re can do there, from the parsed pattern and the name's length n: the ways the
    pattern can match at one position (a repeat of one character has at most n+1, a repeat of a
    sub-pattern of w ways up to w^k over its k repeats, a branch the sum of its alternatives, a sequence
    the product), times the steps of one way, times the positions tried. When the matches of one set
    would cost more than MATCH_STEPS in all, the pattern that crossed it is refused:
    nested quantifiers and long chains of them cross it at once, while patterns of module names (escaped
    names, `.*`, classes, alternatives) stay orders of magnitude below. Back references and conditional
    groups are refused: module patterns have no use for them. Each pattern is at most PATTERN_CHARS long
    and a set at most PATTERNS, so checking them is bounded too.

    `peft`: matched as PEFT matches rank_pattern keys (peft.utils.other.get_pattern_key), against the
    name or a dotted tail of it: re.match(rf"(.*\.)?({key})$", name). Each tail is tried directly instead
    of letting re backtrack over the `.*` (the same answer: the key compiles on its own, so it cannot
    reach outside its group, and it holds no back reference to count groups by). Else as re.search.
    """

    def __init__(self, patterns: Iterable[str], field: str, label: Callable[[str], str], error=SourceError, *,
                 peft: bool):
        """`field` names the set in errors about all of it, `label(pattern)` one pattern of it."""
        patterns = list(patterns)
        if len(patterns) > PATTERNS:
            raise error(f"{field}: {len(patterns)} patterns; compose takes at most {PATTERNS}")
        self.field, self.label, self.error, self.peft = field, label, error, peft
        self.spent = 0
        self._costs: dict[tuple[int, int], int] = {}
        self.patterns = [(p, *self._compile(p)) for p in patterns]

    def _compile(self, p: str):
        if not isinstance(p, str):
            raise self.error(f"{self.label(p)}: a pattern must be a string")
        if len(p) > PATTERN_CHARS:
            raise self.error(f"{self.label(p)}: a pattern of {len(p)} characters; compose takes at most "
                             f"{PATTERN_CHARS}")
        try:
            compiled = re.compile(p)  # first on its own: a key that does not compile alone cannot escape its group
            if self.peft:
                re.compile(rf"(.*\.)?({p})$")  # what PEFT compiles (a global flag inside it is an error)
                compiled = re.compile(rf"(?:{p})$")
            tree = _sre_parse.parse(p)
            _cost(tree, 0)  # refuses what the bound does not cover
        except re.error as e:
            raise self.error(f"{self.label(p)} is not a valid pattern ({e})") from None
        except RecursionError:
            raise self.error(f"{self.label(p)}: a pattern nested too deeply") from None
        except _Unsupported as e:
            raise self.error(f"{self.label(p)}: {e} is not supported in module patterns") from None
        return compiled, tree

    def first(self, name: str) -> int | None:
        """The index of the first pattern that matches `name`, None when none does."""
        if self.peft:  # the name, then each tail after a dot that `.*` reaches (it stops at a newline)
            cut = len(name) if "\n" not in name else name.index("\n")
            starts = [0] + [i + 1 for i in range(cut) if name[i] == "."]
        for k, (p, compiled, tree) in enumerate(self.patterns):
            self._spend(k, p, tree, name, len(starts) if self.peft else len(name) + 1)
            if any(compiled.match(name, s) for s in starts) if self.peft else compiled.search(name):
                return k
        return None

    def _spend(self, k: int, p: str, tree, name: str, tries: int) -> None:
        per = self._costs.get((k, len(name)))
        if per is None:
            ways, steps = _cost(tree, len(name))
            per = self._costs[k, len(name)] = min(ways * (steps + 1), _CAP)
        cost = min(per * tries, _CAP)
        self.spent += cost
        if cost > MATCH_STEPS:
            raise self.error(f"{self.label(p)}: matching it against {_short(name)!r} could take over "
                             f"{MATCH_STEPS:,} steps (nested or chained quantifiers backtrack catastrophically); "
                             "compose refuses it")
        if self.spent > MATCH_STEPS:
            raise self.error(f"{self.field}: matching its patterns against the module names could take over "
                             f"{MATCH_STEPS:,} steps in all (at {self.label(p)} on {_short(name)!r})")


class _Unsupported(Exception):
    pass


_ONE = {_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN, _sre.AT}
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", _sre.MAX_REPEAT)}
_ATOMIC = getattr(_sre, "ATOMIC_GROUP", None)  # Python 3.11+


def _cost(items, n: int) -> tuple[int, int]:
    """(ways, steps) of a parsed pattern at one position of an n-character name: at most how many ways re's
    backtracking matcher can try to match it there, and how many steps one way takes (both capped)."""
    ways, steps = 1, 0
    for op, av in items:
        if op in _ONE:
            w, s = 1, 1
        elif op == _sre.SUBPATTERN:
            w, s = _cost(av[-1], n)
        elif op == _ATOMIC:  # an atomic group or lookaround tries fewer ways than this; still a bound
            w, s = _cost(av, n)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            w, s = _cost(av[1], n)
        elif op == _sre.BRANCH:  # each alternative in turn
            parts = [_cost(b, n) for b in av[1]]
            w, s = sum(p[0] for p in parts), sum(p[1] for p in parts)
        elif op in _REPEATS:
            lo, hi, body = av
            bw, bs = _cost(body, n)
            top = max(lo, min(hi, n + 1))  # past `lo`, a repeat that consumes nothing ends the loop
            w = top - lo + 1 if bw == 1 else _CAP if top > 64 else sum(bw ** k for k in range(lo, top + 1))
            s = top * bs + 1
        elif op == _sre.GROUPREF:
            raise _Unsupported("a back reference")
        elif op == _sre.GROUPREF_EXISTS:
            raise _Unsupported("a conditional group")
        else:
            raise _Unsupported(f"{str(op).lower()}")
        ways, steps = min(ways * w, _CAP), min(steps + s, _CAP)
    return ways, steps


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
        label = lambda k, field=field: f"{path}: {field}[{_short(k)!r}]"
        patterns[field] = (ModulePatterns(p, f"{path}: {field}", label, peft=True), list(p.values()))
    saved = c.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        raise SourceError(f"{path}: modules_to_save must be a list of module names, got {saved!r}")
    return {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "modules_to_save": saved,
            "bias": c.get("bias", "none"), **patterns}


def _short(text: str, most: int = 80) -> str:
    """`text` cut to `most` characters for an error line (a hostile key can be any length)."""
    return text if len(text) <= most else f"{text[:most - 3]}..."


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
