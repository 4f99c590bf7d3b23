"""`compose extract-lora`: a PEFT LoRA adapter of rank r from the difference of two models.

The same adapter mergekit-extract-lora (mergekit 0.1.5, scripts/extract_lora.py) writes, by its math and
with its options:
- every linear layer's task vector delta = fine-tuned - base is cut to rank r = min(--rank, its smaller
  side, the count of singular values above --sv-epsilon) by SVD, delta ~ U S Vh. With distribute_scale
  (the default) the singular values are split evenly, A = sqrt(S) Vh[:r], B = U[:, :r] sqrt(S); without,
  A = S Vh[:r], B = U[:, :r]. Either way B @ A is the best rank-r approximation;
- the embeddings and the head are saved whole in `modules_to_save` (their modules' last names), or with
  --embed-lora decomposed: the head as a linear layer, the input embedding transposed (PEFT's
  lora_embedding_A [r, vocab] and lora_embedding_B [hidden, r]);
- a tensor of a module that is not linear (the norms) is saved whole, or left out with
  --skip-undecomposable; --save-module saves the modules of that name whole; --include-regex /
  --exclude-regex choose the modules considered at all (searched in the module's name, as mergekit does);
- adapter_config.json has lora_alpha = r (a scale of exactly 1) and, for modules whose rank came out
  lower than r, the same rank in rank_pattern and alpha_pattern (their patterns escaped, so a dot is a dot).
Where compose differs:
- the task vector is taken in float32 (mergekit subtracts in the stored dtype first, which rounds a bf16
  delta before the SVD);
- biases: mergekit writes the bias difference as `lora_B.bias` without `lora_bias` in the config, so PEFT
  drops it (and with `lora_bias` PEFT adds a bias to every target, and cannot merge those whose base layer
  has none). compose writes the fine-tuned biases of the adapted layers as `base_layer.bias` with
  `bias: lora_only`, which is how PEFT itself saves trained biases: PEFT loads and merges them;
- a module whose every singular value is at or below --sv-epsilon (rank 0, which PEFT cannot hold) is
  written as a rank-1 pair of zeros: exactly no change.

It streams: the header is planned from the shapes, then one module at a time is read, decomposed, written
and freed; the output appears complete or not at all (compose.output). With --sv-epsilon the ranks depend
on the values, so the factors are computed first and held (the adapter's own size) before writing.
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from compose.errors import BuildError, SourceError

PREFIX = "base_model.model."
EMBED, HEAD = "model.embed_tokens", "lm_head"
"""The vocabulary-sized modules: saved whole unless --embed-lora (mergekit's get_input/output_embeddings)."""


@dataclass(frozen=True)
class Options:
    """mergekit-extract-lora's options, under its flag names."""

    rank: int
    sv_epsilon: float = 0.0
    distribute_scale: bool = True
    embed_lora: bool = False
    save_modules: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    skip_undecomposable: bool = False

    def patterns(self) -> tuple:
        """--include-regex and --exclude-regex as matchers of bounded cost (compose.lora.ModulePatterns)."""
        from compose.lora import ModulePatterns

        return tuple(ModulePatterns(p, flag, lambda x, flag=flag: f"{flag}: {x!r}", BuildError, peft=False)
                     for flag, p in (("--include-regex", self.include), ("--exclude-regex", self.exclude)))

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise BuildError(f"--rank: must be a positive integer, got {self.rank!r}")
        eps = self.sv_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise BuildError(f"--sv-epsilon: must be a finite number >= 0, got {eps!r}")
        self.patterns()  # refuses a bad or too costly pattern before any model is read
        for m in self.save_modules:
            if not m or not isinstance(m, str):
                raise BuildError(f"--save-module: must be a module name, got {m!r}")


@dataclass
class Module:
    """One module of the model and what the adapter holds for it: kind `lora`, `embed` (transposed LoRA),
    `full` (saved whole) or `skip`; `bias` is its bias tensor's name, if any."""

    name: str
    kind: str
    weight: str | None = None
    bias: str | None = None
    rank: int = 0


def _modules(base, model, o: Options) -> list[Module]:
    """The model's modules in its tensor order, each with what mergekit's plan_extraction does with it."""
    from compose.backends.shards import ST_CODES

    base_keys, model_keys = set(base.keys()), set(model.keys())
    if base_keys != model_keys:
        extra = sorted(model_keys - base_keys) or sorted(base_keys - model_keys)
        side = "the fine-tuned model" if model_keys - base_keys else "the base model"
        raise SourceError(f"{base.ref} and {model.ref} hold different tensors: {extra[0]} is only in {side} "
                          "(extract-lora needs two models of one architecture)")
    by_name: dict[str, Module] = {}
    for key in model.keys():
        shape, dtype = model.meta(key)
        bshape, _ = base.meta(key)
        if shape != bshape:
            raise SourceError(f"{key} has shape {list(shape)} in {model.ref} but {list(bshape)} in {base.ref}")
        if dtype not in ST_CODES:
            raise SourceError(f"{model.ref}: tensor {key} is {dtype}; extract-lora reads floating-point weights")
        name, _, leaf = key.rpartition(".")
        m = by_name.setdefault(name, Module(name, ""))
        if leaf == "bias":
            m.bias = key
        else:
            m.weight = key  # a module's one other tensor (weight, or a norm's scale under another leaf name)
    saved = list(o.save_modules)
    include, exclude = o.patterns()
    out = []
    for m in by_name.values():
        last = m.name.rpartition(".")[2]
        if m.name in (EMBED, HEAD) and not o.embed_lora and exclude.first(m.name) is None:
            if last not in saved:
                saved.append(last)
        linear = m.weight is not None and m.weight.endswith(".weight") and len(model.meta(m.weight)[0]) == 2
        if m.name in saved or last in saved:
            m.kind = "full"
        elif o.include and include.first(m.name) is None or exclude.first(m.name) is not None:
            m.kind = "skip"
        elif linear:
            m.kind = "embed" if m.name == EMBED else "lora"
            shape = model.meta(m.weight)[0]
            m.rank = min(o.rank, *shape)
        elif m.weight is not None and len(model.meta(m.weight)[0]) > 2:
            raise SourceError(f"{model.ref}: tensor {m.weight} has {len(model.meta(m.weight)[0])} dimensions; "
                              "extract-lora decomposes linear layers (a fused expert tensor is not one yet; "
                              "--exclude-regex leaves it out)")
        elif o.skip_undecomposable:
            m.kind = "skip"
        else:
            m.kind = "full"
            if last not in saved:
                saved.append(last)
        out.append(m)
    if not any(m.kind in ("lora", "embed") for m in out):
        raise BuildError("extract-lora: no linear layer is left to decompose (check --include-regex, "
                         "--exclude-regex and --save-module)")
    return out


NOT_MEANING = frozenset({"dtype", "bos_token_id", "eos_token_id", "pad_token_id", "max_positions", "extra",
                         "weights", "trainable", "origin", "identity"})
"""What two models of one architecture may differ in: storage dtype, special tokens, the context limit (an
instruct model often declares a shorter one), fields compose does not interpret, and the weights
themselves. Every other typed field of the config and of each node changes what a tensor means."""


def check_same_architecture(model, base) -> None:
    """Refuse two models that compose reads differently (another family, sliding window, rope, norm eps, ...):
    an adapter of their difference, applied to the base, would not be the fine-tuned model. Compared as
    compose's IR reads them, so a field counts as its family interprets it (Qwen2's sliding_window only
    with use_sliding_window)."""
    from compose.lower import lower
    from compose.sources import open_source
    from compose.spec import LoadSpec

    if model.config.get("model_type") != base.config.get("model_type"):
        raise SourceError(_differ_msg(model, base, "model_type", model.config.get("model_type"),
                                      base.config.get("model_type")))
    gm, gb = (lower(LoadSpec(ref=s.ref), open_source, flag) for s, flag in ((model, "--model"), (base, "--base")))
    if len(gm.blocks()) != len(gb.blocks()):
        raise SourceError(_differ_msg(model, base, "num_hidden_layers", len(gm.blocks()), len(gb.blocks())))
    for (name, a), (_, b) in zip([("config", gm.config), *gm.items()], [("config", gb.config), *gb.items()]):
        diff = _first_difference(a, b, name)
        if diff is not None:
            raise SourceError(_differ_msg(model, base, *diff))


def _first_difference(a, b, where: str):
    """(field path, a's value, b's value) of the first meaningful field where two IR values differ, or None."""
    import dataclasses

    from compose.ir.weights import Expr

    if isinstance(a, Expr) and isinstance(b, Expr):
        return None  # a weight: _modules compares the tensors' names and shapes
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):  # an MoE's experts, rope factors
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{where}[{i}]"))),
                    None)
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        for f in dataclasses.fields(a):
            if f.name not in NOT_MEANING:
                diff = _first_difference(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
                if diff is not None:
                    return diff
        return None
    return None if a == b else (where, a, b)


def _differ_msg(model, base, field: str, in_model, in_base) -> str:
    def show(v) -> str:
        return type(v).__name__ if hasattr(v, "params") else repr(v)  # an IR node: its kind, not its weights

    return (f"{model.ref} and {base.ref} differ in {field}: {show(in_model)} in the model, {show(in_base)} in the "
            "base (extract-lora needs two models of one architecture)")


def decompose(delta, rank: int, *, sv_epsilon: float = 0.0, distribute_scale: bool = True):
    """(A, B) with B @ A the truncated SVD of `delta`, of rank min(rank, smaller side, count of singular
    values > sv_epsilon); the singular values split as their square roots between the two
    (distribute_scale) or all in A. Rank 0 comes out as a rank-1 pair of zeros."""
    import torch

    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(int((s > sv_epsilon).sum().item()), r)
    if r == 0:
        return delta.new_zeros((1, delta.shape[1]), dtype=torch.float32), delta.new_zeros(
            (delta.shape[0], 1), dtype=torch.float32)
    if distribute_scale:
        root = torch.sqrt(s[:r])
        return root[:, None] * vh[:r], u[:, :r] * root[None, :]
    return s[:r, None] * vh[:r], u[:, :r].clone()


def extract(model_ref: str, base_ref: str, out, rank: int | Options, *, force: bool = False, device: str = "cpu",
            progress: bool = False) -> Path:
    """Write an adapter of `model_ref` - `base_ref` into the folder `out` (`rank`: the rank, or Options)."""
    import torch

    from compose.backends.shards import Entry, write_shard
    from compose.output import OutputFolder, absolute
    from compose.pipeline import check_device, check_not_a_source
    from compose.sources import clear_cache, open_source

    o = rank if isinstance(rank, Options) else Options(rank)
    o.check()
    check_device(device)
    clear_cache()
    base, model = open_source(base_ref), open_source(model_ref)
    out = absolute(out)
    check_not_a_source(out)
    modules = _modules(base, model, o)
    check_same_architecture(model, base)
    lora = [m for m in modules if m.kind in ("lora", "embed")]
    # mergekit writes no bias for a LoRA layer in a form PEFT reads; PEFT's own form is the whole trained
    # bias of each adapted layer (bias: lora_only), written when any of them changed.
    biased = [m for m in lora if m.bias is not None]
    with_bias = any(not torch.equal(base.tensor(m.bias), model.tensor(m.bias)) for m in biased)

    def factors(m: Module):
        b, f = base.tensor(m.weight).to(device), model.tensor(m.weight).to(device)
        delta = f.to(torch.float32) - b.to(torch.float32)
        a, bb = decompose(delta.T if m.kind == "embed" else delta, m.rank, sv_epsilon=o.sv_epsilon,
                          distribute_scale=o.distribute_scale)
        dtype = getattr(torch, model.meta(m.weight)[1])
        return a.to(dtype).cpu(), bb.to(dtype).cpu()

    held = {}
    if o.sv_epsilon > 0:  # the ranks depend on the values: decomposed before the header is planned
        for i, m in enumerate(lora):
            if progress:
                print(f"\rcompose: extract-lora SVD {i + 1}/{len(lora)} {m.name}", end="", file=sys.stderr)
            held[m.name] = factors(m)
            m.rank = held[m.name][0].shape[0]
        if progress:
            print(file=sys.stderr)

    entries, jobs = [], []
    for m in modules:
        if m.kind == "skip":
            continue
        if m.kind == "full":
            for key in (m.weight, m.bias):
                if key is not None:
                    entries.append(Entry(f"{PREFIX}{key}", tuple(model.meta(key)[0]), model.meta(key)[1]))
                    jobs.append((m, "full", key))
            continue
        shape, dtype = model.meta(m.weight)
        rows, cols = (shape[1], shape[0]) if m.kind == "embed" else shape
        a, b = ("lora_embedding_A", "lora_embedding_B") if m.kind == "embed" else ("lora_A.weight", "lora_B.weight")
        entries += [Entry(f"{PREFIX}{m.name}.{a}", (m.rank, cols), dtype),
                    Entry(f"{PREFIX}{m.name}.{b}", (rows, m.rank), dtype)]
        jobs.append((m, "lora", None))
        if with_bias and m.bias is not None:
            entries.append(Entry(f"{PREFIX}{m.name}.base_layer.bias", tuple(model.meta(m.bias)[0]),
                                 model.meta(m.bias)[1]))
            jobs.append((m, "full", m.bias))

    def tensors():
        for i, (m, kind, key) in enumerate(jobs):
            if progress:
                print(f"\rcompose: extract-lora {i + 1}/{len(jobs)} {key or m.name}", end="", file=sys.stderr)
            if kind == "full":
                yield model.tensor(key)
            else:
                yield from held.pop(m.name, None) or factors(m)

    with OutputFolder(out, force, marker="adapter_config.json") as folder:
        write_shard(folder.tmp / "adapter_model.safetensors", entries, tensors())
        if progress:
            print(file=sys.stderr)
        config = _config(base, modules, o, with_bias)
        (folder.tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        folder.commit()
    return out


def _config(base, modules: list[Module], o: Options, with_bias: bool) -> dict:
    """adapter_config.json as mergekit-extract-lora writes it (sorted, so the file is deterministic)."""
    ranks = {m.name: m.rank for m in modules if m.kind in ("lora", "embed")}
    top = max(ranks.values())
    lower = {re.escape(name): r for name, r in ranks.items() if r != top}
    saved = set(o.save_modules) | {m.name.rpartition(".")[2] for m in modules if m.kind == "full"}
    return {
        "base_model_name_or_path": base.ref,
        "peft_type": "LORA",
        "use_rslora": False,
        "target_modules": sorted({name.rpartition(".")[2] for name in ranks}),
        "modules_to_save": sorted(saved),
        "task_type": "CAUSAL_LM",
        "r": top,
        "lora_alpha": top,
        "rank_pattern": lower,
        "alpha_pattern": dict(lower),
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "bias": "lora_only" if with_bias else "none",
        "inference_mode": True,
    }
