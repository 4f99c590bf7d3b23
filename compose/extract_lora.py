"""`compose extract-lora`: a PEFT LoRA adapter of rank r from the difference of two models.

The same adapter mergekit-extract-lora (mergekit 0.1.5, scripts/extract_lora.py) writes, by its math:
- every linear layer's task vector delta = fine-tuned - base is cut to rank r = min(--rank, its smaller
  side) by SVD, delta ~ U S Vh, with the singular values split evenly: A = sqrt(S) Vh[:r], B = U[:, :r]
  sqrt(S) (so B @ A is the best rank-r approximation, and neither factor carries all the scale);
- the embeddings, the head and every tensor of a layer that is not linear (the norms) are saved whole, in
  `modules_to_save` under their modules' last names, as mergekit does without --embed-lora;
- adapter_config.json has lora_alpha = r (a scale of exactly 1) and, for modules whose rank came out
  lower than r, the same rank in rank_pattern and alpha_pattern (their patterns escaped, so a dot is a dot).
Where compose differs: the task vector is taken in float32 (mergekit subtracts in the stored dtype first,
which rounds a bf16 delta before the SVD); biases are not extracted (mergekit writes `lora_B.bias`, which
PEFT's LoRA layers have no place for unless lora_bias is set), so models whose biases differ are refused.

It streams: the header is planned from the shapes, then one module at a time is read, decomposed, written
and freed; the output appears complete or not at all (compose.output).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from compose.errors import BuildError, SourceError

PREFIX = "base_model.model."
FULL_RANK = ("model.embed_tokens.weight", "lm_head.weight")
"""Tensors saved whole, never decomposed: the vocabulary-sized ones (mergekit's default, no --embed-lora)."""


def _plan(base, model, rank: int):
    """[(kind, tensor name, output entries)]: kind `lora` (SVD) or `full` (saved whole), in the model's order."""
    from compose.backends.shards import ST_CODES, Entry

    base_keys, model_keys = set(base.keys()), set(model.keys())
    if base_keys != model_keys:
        extra = sorted(model_keys - base_keys) or sorted(base_keys - model_keys)
        side = "the fine-tuned model" if model_keys - base_keys else "the base model"
        raise SourceError(f"{base.ref} and {model.ref} hold different tensors: {extra[0]} is only in {side} "
                          "(extract-lora needs two models of one architecture)")
    plan = []
    for key in model.keys():
        shape, dtype = model.meta(key)
        bshape, _ = base.meta(key)
        if shape != bshape:
            raise SourceError(f"{key} has shape {list(shape)} in {model.ref} but {list(bshape)} in {base.ref}")
        if dtype not in ST_CODES:
            raise SourceError(f"{model.ref}: tensor {key} is {dtype}; extract-lora reads floating-point weights")
        if key.endswith(".bias"):
            plan.append(("bias", key, []))
        elif len(shape) == 2 and key.endswith(".weight") and key not in FULL_RANK:
            module = key.removesuffix(".weight")
            r = min(rank, *shape)
            plan.append(("lora", key, [Entry(f"{PREFIX}{module}.lora_A.weight", (r, shape[1]), dtype),
                                       Entry(f"{PREFIX}{module}.lora_B.weight", (shape[0], r), dtype)]))
        elif len(shape) <= 2:
            plan.append(("full", key, [Entry(f"{PREFIX}{key}", tuple(shape), dtype)]))
        else:
            raise SourceError(f"{model.ref}: tensor {key} has {len(shape)} dimensions; extract-lora decomposes "
                              "linear layers (a fused expert tensor is not one yet)")
    return plan


def decompose(delta, rank: int):
    """(A, B) of rank min(rank, smaller side) with B @ A the truncated SVD of `delta`, the singular values
    split as their square roots between the two (mergekit's distribute_scale)."""
    import torch

    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    r = min(rank, s.shape[0])
    root = torch.sqrt(s[:r])
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def extract(model_ref: str, base_ref: str, out, rank: int, *, force: bool = False, device: str = "cpu",
            progress: bool = False) -> Path:
    """Write a rank-`rank` adapter of `model_ref` - `base_ref` into the folder `out`."""
    import torch

    from compose.backends.shards import write_shard
    from compose.output import OutputFolder, absolute
    from compose.pipeline import check_device, check_not_a_source
    from compose.sources import clear_cache, open_source

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise BuildError(f"--rank: must be a positive integer, got {rank!r}")
    check_device(device)
    clear_cache()
    base, model = open_source(base_ref), open_source(model_ref)
    out = absolute(out)
    check_not_a_source(out)
    plan = _plan(base, model, rank)

    def tensors():
        for i, (kind, key, entries) in enumerate(plan):
            if progress:
                print(f"\rcompose: extract-lora {i + 1}/{len(plan)} {key}", end="", file=sys.stderr)
            if kind == "full":
                yield model.tensor(key)
                continue
            b, m = base.tensor(key).to(device), model.tensor(key).to(device)
            delta = m.to(torch.float32) - b.to(torch.float32)
            if kind == "bias":
                if delta.abs().max().item() != 0:
                    raise SourceError(f"{key} differs between {model.ref} and {base.ref}; extract-lora does not "
                                      "extract biases (PEFT's LoRA has no place for them)")
                continue
            a, bb = decompose(delta, rank)
            yield a.to(getattr(torch, entries[0].dtype)).cpu()
            yield bb.to(getattr(torch, entries[1].dtype)).cpu()
            del b, m, delta

    entries = [e for _, _, es in plan for e in es]
    with OutputFolder(out, force) as folder:
        write_shard(folder.tmp / "adapter_model.safetensors", entries, tensors())
        if progress:
            print(file=sys.stderr)
        (folder.tmp / "adapter_config.json").write_text(json.dumps(_config(base, plan, rank), indent=2) + "\n")
        folder.commit()
    return out


def _config(base, plan, rank: int) -> dict:
    """adapter_config.json as mergekit-extract-lora writes it (sorted, so the file is deterministic)."""
    ranks = {key.removesuffix(".weight"): entries[0].shape[0] for kind, key, entries in plan if kind == "lora"}
    top = max(ranks.values(), default=rank)
    lower = {re.escape(m): r for m, r in ranks.items() if r != top}
    saved = sorted({key.rpartition(".")[0].rpartition(".")[2] for kind, key, _ in plan if kind == "full"})
    return {
        "base_model_name_or_path": base.ref,
        "peft_type": "LORA",
        "use_rslora": False,
        "target_modules": sorted({m.rpartition(".")[2] for m in ranks}),
        "modules_to_save": saved,
        "task_type": "CAUSAL_LM",
        "r": top,
        "lora_alpha": top,
        "rank_pattern": lower,
        "alpha_pattern": dict(lower),
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
