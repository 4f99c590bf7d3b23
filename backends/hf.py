"""The hf backend: a verified Graph -> config.json + sharded safetensors for a native transformers class.

Tensors are evaluated and written one at a time (see shards.py and ir/evaluate.py). The caller owns the
output folder's atomicity (compose.build writes into a temporary folder and renames it into place).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from compose.errors import BuildError
from compose.ir import Graph, Load
from compose.ir.evaluate import Evaluator, torch_dtype
from compose.ir.weights import Expr
from compose.backends.hf_moe import block_tensors, moe_config, target
from compose.codegen.render import composite_kind, is_composite
from compose.ir.nodes import Adapter, CrossAttention
from compose.backends.shards import Entry, parse_size, plan_shards, prefetch, shard_names, write_index, write_shard

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def kind_of(g: Graph) -> str:
    """The class the checkpoint is for: dense, mixtral, qwen2_moe, or custom (generated code + auto_map)."""
    return "custom" if is_composite(g) else target(g)


def parts(g: Graph) -> list[tuple[bool, dict[str, Expr]]]:
    """(trains, output tensor name -> expression) for each op, in file order (Hugging Face names of the
    target class; for a composite model, the generated module's: `augment.layers.0.*`, `cross.0.*`).
    A block's visual expert is a part of its own: it trains while the block around it is frozen."""
    kind = kind_of(g)
    out = [(bool(g.embedding.trainable), {"model.embed_tokens.weight": g.embedding.params()["weight"]})]
    for i, (_, b) in enumerate(g.blocks()):
        named = block_tensors(kind, f"model.layers.{i}.", b)
        vision = {k: e for k, e in named.items() if k.startswith(f"model.layers.{i}.vision_expert.")}
        out.append((bool(b.trainable), {k: e for k, e in named.items() if k not in vision}))
        if vision:
            out.append((bool(b.trainable or b.vision.trainable), vision))
    out.append((bool(g.final_norm.trainable), {"model.norm.weight": g.final_norm.params()["weight"]}))
    if not g.head.tied:
        out.append((bool(g.head.trainable), {"lm_head.weight": g.head.params()["weight"]}))
    dead = set(g.dead())
    for prefix in g.side_configs:
        embed = g.op(f"{prefix}.embed")
        out.append((bool(embed.trainable), {f"{prefix}.embed_tokens.weight": embed.params()["weight"]}))
        live = [b for n, b in g.side_blocks(prefix) if n not in dead]
        out += [(bool(b.trainable), {f"{prefix}.layers.{j}.{k}": e for k, e in b.params().items()})
                for j, b in enumerate(live)]
    cross = [op for _, op in g.items() if isinstance(op, CrossAttention)]
    out += [(bool(op.trainable), {f"cross.{k}.{n}": e for n, e in op.params().items()}) for k, op in enumerate(cross)]
    out += [(bool(op.trainable), {f"{name}.{k}": e for k, e in op.params().items()})
            for name, op in g.items() if isinstance(op, Adapter)]
    return out


def tensors(g: Graph) -> dict[str, Expr]:
    """Output tensor name -> expression, in file order."""
    return {k: e for _, named in parts(g) for k, e in named.items()}


def trainable_names(g: Graph) -> list[str]:
    return [k for trains, named in parts(g) if trains for k in named]


AUTO_MAP = {"AutoConfig": "modeling_compose_hf.ComposeConfig",
            "AutoModelForCausalLM": "modeling_compose_hf.ComposeHFForCausalLM"}


def _custom_config(g: Graph) -> dict:
    """config.json of a model only the generated code runs: transformers reads auto_map and the basics."""
    src = g.config.source_config()
    keep = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
    return {"model_type": "compose", "architectures": ["ComposeHFForCausalLM"], "auto_map": AUTO_MAP,
            "vocab_size": g.config.vocab, "hidden_size": g.config.hidden, "num_hidden_layers": len(g.blocks()),
            "tie_word_embeddings": g.head.tied, "dtype": g.config.dtype,
            **{k: src[k] for k in keep if k in src},
            "compose": {"kind": composite_kind(g), "family": g.config.family,
                        **{p: c.family for p, c in g.side_configs.items()},
                        **{k: v for k, v in g.meta.items() if k in ("calm", "visual_expert")}}}


def hf_config(g: Graph) -> dict:
    if is_composite(g):
        return _custom_config(g)
    cfg = g.config.source_config()
    if g.config.family not in ARCHITECTURES:
        raise BuildError(f"the hf backend has no native class for family {g.config.family!r}")
    blocks = g.blocks()
    kind = target(g)
    if kind != "dense":
        cfg = moe_config(g, cfg, kind)
        cfg["num_hidden_layers"] = len(blocks)
        cfg["dtype"] = g.config.dtype
        return cfg
    cfg["architectures"] = [ARCHITECTURES[g.config.family]]
    cfg["num_hidden_layers"] = len(blocks)
    cfg["dtype"] = g.config.dtype
    cfg.pop("torch_dtype", None)
    cfg.pop("_name_or_path", None)
    if isinstance(cfg.get("layer_types"), list):
        # Each block keeps the attention type of the layer it came from.
        src_types = cfg["layer_types"]
        cfg["layer_types"] = [src_types[b.origin.layer] if b.origin.layer < len(src_types) else "full_attention"
                              for _, b in blocks]
    if "max_window_layers" in cfg:
        cfg["max_window_layers"] = min(int(cfg["max_window_layers"]), len(blocks))
    return cfg


def _reader():
    from compose.sources import open_source

    return lambda e: open_source(e.source).tensor(e.key)


def write(g: Graph, out: Path, *, max_shard_size: str | int = "5GB", progress: bool = True, workers: int = 2,
          device: str = "cpu") -> dict:
    """Write weights and config into `out` (an existing empty folder); return what was written.

    `workers` tensors are computed ahead of the writer on threads; `device` is where merges compute
    (`cuda` for a GPU); what is written always goes through the CPU.
    """
    import json

    from tqdm import tqdm

    named = tensors(g)
    dtype = g.config.dtype
    tdtype = torch_dtype(dtype)
    entries = [Entry(n, tuple(e.shape), dtype) for n, e in named.items()]
    def working_set(e: Entry) -> float:
        """Working memory while producing a tensor, roughly: its inputs plus a merge's temporaries."""
        leaves = sum(1 for x in named[e.name].walk() if isinstance(x, Load))
        return e.nbytes * (leaves + (8 if leaves > 1 else 1))

    costs = {e.name: working_set(e) for e in entries}  # walked once; the prefetcher asks per start and end

    # Largest first (a stable sort: deterministic, and the same file whatever `workers` is): the embedding
    # and head, the slowest to merge, start first instead of leaving one worker alone at the end.
    entries.sort(key=lambda e: -e.nbytes)
    shards = plan_shards(entries, parse_size(max_shard_size))
    files = shard_names(len(shards))
    evaluate = Evaluator(named.values(), _reader(), device=device)
    total = sum(e.nbytes for e in entries)
    sha: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress,
              leave=False) as bar:
        stream = prefetch(entries, lambda e: evaluate(named[e.name]).to(device="cpu", dtype=tdtype), workers,
                          cost=lambda e: costs[e.name], budget=1.25 * max(costs.values()))
        for fname, shard in zip(files, shards):
            sha[fname] = write_shard(out / fname, shard, stream, bar.update)
    if len(files) > 1:
        write_index(out / "model.safetensors.index.json",
                    {e.name: f for f, shard in zip(files, shards) for e in shard}, total)
    (out / "config.json").write_text(json.dumps(hf_config(g), indent=2, sort_keys=True) + "\n")
    copied = _copy_extra_files(g, out)
    return {"shards": sha, "files": sorted(files + copied + ["config.json"]), "total_bytes": total}


def _copy_extra_files(g: Graph, out: Path) -> list[str]:
    """Tokenizer and generation config travel with the embeddings: copied from their source."""
    from compose.sources import open_source

    ref = g.meta.get("tokenizer_source")
    if hasattr(ref, "write"):  # a merged vocabulary (compose.tokenizer_merge): built, not copied
        return ref.write(out)
    if ref is None:
        w = g.embedding.params()["weight"]
        ref = w.source if isinstance(w, Load) else None
    if ref is None:
        return []
    copied = []
    for f in open_source(ref).extra_files():
        shutil.copyfile(f, out / f.name)
        copied.append(f.name)
    return copied
