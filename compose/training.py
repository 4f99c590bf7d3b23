"""Train what was composed: freeze all but the parameters compose.json's `trainable` names.

    model = AutoModelForCausalLM.from_pretrained(out)        # or the generated ComposeForCausalLM
    freeze(model, out)                                       # requires_grad exactly on what trains
    opt = torch.optim.AdamW(param_groups(model, out, lr=1e-4, weight_decay=0.1))
    print(trainable_summary(model))

compose.json names tensors as the checkpoint does. In memory, transformers 5 (and the generated module,
which copies its layout) holds a mixture of experts stacked: one `experts.gate_up_proj` and one
`experts.down_proj` per layer, under `mlp.` (each family says how its checkpoint names map there:
compose.families). We map names by those rules rather than through transformers' conversion table, so
the same code serves the generated module (no transformers) and models that never went through
transformers' loader. A stacked parameter trains if any expert's tensor in it does.

torch is imported inside the functions: `import compose` stays cheap.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from compose.errors import ComposeError
from compose.families import in_memory_name

# Prefixes wrappers add to parameter names: DDP's `module.`, torch.compile's `_orig_mod.`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name, changed = name[len(p):], True
    # DDP/FSDP1 and activation checkpointing insert these in the middle of names too.
    return name.replace("._fsdp_wrapped_module.", ".").replace("._checkpoint_wrapped_module.", ".")


def trainable_names(out_dir) -> list[str]:
    """The checkpoint names compose.json lists under `trainable`."""
    path = Path(out_dir) / "compose.json"
    if not path.is_file():
        raise ComposeError(f"{path} not found: freeze() needs the folder `compose build` wrote")
    return list(json.loads(path.read_text())["trainable"])


def _trainable_params(model, out_dir) -> set[int]:
    """ids of the parameters that train. Every name is matched through all names of a parameter
    (remove_duplicate=False), so a tied lm_head.weight finds the embedding it shares."""
    by_name: dict[str, object] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_name[_strip_wrappers(name)] = p
    names = trainable_names(out_dir)

    def find(n: str):
        n = in_memory_name(n)
        return by_name.get(n, by_name.get(_fused_name(n)))

    unknown = [n for n in names if find(n) is None]
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ComposeError(f"compose.json in {out_dir} lists trainable parameters this model does not have: "
                           f"{', '.join(unknown[:5])}{more}; was the model loaded from that folder?")
    return {id(find(n)) for n in names}


def _fused_name(name: str) -> str:
    """The parameter a checkpoint tensor is part of in the generated module when the fusion passes fused
    it (q/k/v in one qkv_proj, gate/up in one gate_up_proj). compose marks whole blocks trainable, so the
    parts of one fused matrix train together."""
    name = re.sub(r"\.self_attn\.[qkv]_proj\.", ".self_attn.qkv_proj.", name)
    return re.sub(r"\.mlp\.((?:shared_expert|shared_experts)\.)?(?:gate|up)_proj\.", r".mlp.\1gate_up_proj.", name)


def freeze(model, out_dir):
    """Set requires_grad=True exactly on the parameters compose.json in `out_dir` says train; returns
    `model`. Call it before wrapping the model in DDP or fully_shard (both only see requires_grad)."""
    train = _trainable_params(model, out_dir)
    for p in model.parameters():
        p.requires_grad_(id(p) in train)
    return model


def param_groups(model, out_dir=None, *, lr: float | None = None, weight_decay: float = 0.0) -> list[dict]:
    """Optimiser groups of the trainable parameters: weight decay on matrices (and stacked experts), none
    on vectors (norm gains, biases), as nanoGPT and transformers' Trainer do. With `out_dir`, freeze()
    is applied first; without it, the parameters with requires_grad are used.

        AdamW(param_groups(model, out, lr=1e-4, weight_decay=0.1))
        Trainer(model=model, args=args, optimizers=(AdamW(param_groups(model, out, lr=...)), None))
    """
    if out_dir is not None:
        freeze(model, out_dir)
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields tied ones once
    extra = {} if lr is None else {"lr": lr}
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **extra},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def trainable_summary(model) -> str:
    """PEFT's line: `trainable params: 12,345 || all params: 678,900 || trainable%: 1.82` (tied
    parameters counted once; under FSDP2 a sharded parameter counts its full size)."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    pct = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.2f}"
