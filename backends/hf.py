"""The hf backend: a verified Graph -> config.json + sharded safetensors for the class the target pass chose.

The target family (compose.families) names every tensor and writes config.json; this module only
evaluates and writes, one tensor at a time (see shards.py and ir/evaluate.py). The caller owns the output
folder's atomicity (compose.build writes into a temporary folder and renames it into place).
"""
from __future__ import annotations

import shutil
from contextlib import closing
from pathlib import Path

from compose import families
from compose.errors import BuildError
from compose.ir import Graph, Load
from compose.ir.evaluate import Evaluator, torch_dtype
from compose.ir.weights import Expr, written_units
from compose.backends.finite import FiniteCheck
from compose.backends.shards import (BYTES, Entry, RawCopy, Releaser, SharedBytes, parse_size, plan_shards, prefetch,
                                     shard_names, write_index, write_shard)


SHARED_BYTES = 256 << 20
"""What the writer keeps of shared and computed expressions between their uses."""


def target(g: Graph) -> families.Family:
    """The family the target pass chose: the one that names the tensors and writes config.json."""
    if g.state.target is None:
        raise BuildError("the graph has no target class yet: backends write what the target pass chose "
                         "(compose.passes.target)")
    return families.get(g.state.target.family)


def parts(g: Graph) -> list[tuple[bool, dict[str, Expr]]]:
    """(trains, output tensor name -> expression) for each op, in file order, under the target class's
    checkpoint names (for a composite, the generated module's: `augment.layers.0.*`, `cross.0.*`)."""
    return target(g).tensors(g)


def tensors(g: Graph) -> dict[str, Expr]:
    """Output tensor name -> expression, in file order."""
    return {k: e for _, named in parts(g) for k, e in named.items()}


def trainable_names(g: Graph) -> list[str]:
    return [k for trains, named in parts(g) if trains for k in named]


def hf_config(g: Graph) -> dict:
    return target(g).config_json(g)


def write(g: Graph, out: Path, open_source, *, max_shard_size: str | int = "5GB", progress: bool = True,
          workers: int = 2, device: str = "cpu", allow_nonfinite: bool = False, max_memory: int | None = None) -> dict:
    """Write weights and config into `out` (an existing empty folder); return what was written.

    `open_source` resolves a Load's source reference to the opened source (the front door's). `workers`
    tensors are computed ahead of the writer on threads; `device` is where merges compute (`cuda` for a
    GPU); what is written always goes through the CPU. Every tensor is checked finite (see `finite`):
    a non-finite source tensor is an error unless `allow_nonfinite` (then a warning names them all).
    `max_memory` (bytes) bounds the working memory of the tensors in flight and what is kept between
    uses; a tensor whose own working set is larger is refused before anything is written.
    """
    import json

    from tqdm import tqdm

    named = tensors(g)
    # Most tensors are written in the model's dtype; a class that keeps some in float32 in a half model
    # (transformers' _keep_in_fp32_modules: router biases, some norms) gets them so.
    dtypes = {n: target(g).tensor_dtype(g, n) for n in named}
    entries = [Entry(n, tuple(e.shape), dtypes[n]) for n, e in named.items()]
    costs = {e.name: working_set(named[e.name], e.dtype) for e in entries}  # the prefetcher asks per start and end
    keep_bytes = SHARED_BYTES
    budget = 1.25 * max(costs.values())
    if max_memory is not None:
        name = max(costs, key=costs.get)
        if costs[name] > max_memory:
            raise BuildError(f"--max-memory {_gb(max_memory)}: tensor {name} alone needs about {_gb(costs[name])} "
                             f"to compute ({named[name]}); allow at least that much")
        keep_bytes = min(SHARED_BYTES, max_memory // 4)
        budget = max(max_memory - keep_bytes, costs[name])

    # Largest first (a stable sort: deterministic, and the same file whatever `workers` is): the embedding
    # and head, the slowest to merge, start first instead of leaving one worker alone at the end.
    entries.sort(key=lambda e: -e.nbytes)
    shards = plan_shards(entries, parse_size(max_shard_size))
    files = shard_names(len(shards))
    check = FiniteCheck(allow_nonfinite)
    # What the cse pass found several outputs to be is read (or merged) once and kept until its last use,
    # where its uses are near enough in the file.
    shared = kept_between_uses(entries, named, {x.expr for x in g.state.shared}, keep_bytes)
    # A shared plain copy is kept as its bytes; what is computed from it, or stacked, is kept decoded.
    copies = SharedBytes(_plain_copies(named, shared, dtypes))
    evaluate = Evaluator(named.values(), lambda e: check.source(e, open_source(e.source).tensor(e.key)),
                         device=device, keep=shared, cache_bytes=keep_bytes)

    def raw_copy(expr: Load) -> RawCopy | None:
        span = open_source(expr.source).span(expr.key)
        return None if span is None else RawCopy(*span, check=check.raw(expr))

    def produce(e: Entry):
        expr = named[e.name]
        if isinstance(expr, Load) and expr.dtype == e.dtype:  # a plain copy: its bytes, never decoded
            if expr in copies:
                data = copies.get(expr, lambda: None if (r := raw_copy(expr)) is None else r.read_all())
                if data is not None:
                    return data
            else:
                raw = raw_copy(expr)
                if raw is not None:
                    return raw
        return check.output(e.name, expr, evaluate(expr).to(device="cpu", dtype=torch_dtype(e.dtype)))

    total = sum(e.nbytes for e in entries)
    sha: dict[str, str] = {}
    # Whatever fails while the workers run (a non-finite chunk found by the writer, a full disk, Ctrl-C)
    # closes the stream on the way out, which stops every worker: one left waiting would keep the process
    # from exiting. Then the finished files are released (waited for), or only closed after a failure.
    with (tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress,
               leave=False) as bar, Releaser() as release,
          closing(prefetch(entries, produce, workers, cost=lambda e: costs[e.name], budget=budget)) as stream):
        for fname, shard in zip(files, shards):
            sha[fname] = write_shard(out / fname, shard, stream, bar.update, done=release)
    if len(files) > 1:
        write_index(out / "model.safetensors.index.json",
                    {e.name: f for f, shard in zip(files, shards) for e in shard}, total)
    config = hf_config(g)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    check.warn()
    copied = _copy_extra_files(g, out, open_source)
    if GENERATION_CONFIG not in copied:
        copied.append(_write_generation_config(g, config, out))
    return {"shards": sha, "files": sorted(files + copied + ["config.json"]), "total_bytes": total}


def working_set(expr: Expr, dtype: str) -> int:
    """Memory while producing a tensor, roughly: its decoded inputs, float32 temporaries for any
    arithmetic, and the result (a plain copy streams through the writer's buffers and needs less)."""
    out = expr.numel * BYTES[dtype]
    if isinstance(expr, Load) and expr.dtype == dtype:
        return out
    leaves = {x for x in expr.walk() if isinstance(x, Load)}
    inputs = sum(x.numel * BYTES[x.dtype] for x in leaves)
    arithmetic = 3 * expr.numel * 4 if any(not isinstance(x, Load) for x in expr.walk()) else 0
    return inputs + arithmetic + out


def _plain_copies(named: dict[str, Expr], shared: set[Expr], dtypes: dict[str, str]) -> dict[Expr, int]:
    """The shared loads every use of which is a whole output in the output's dtype, with their use counts."""
    roots: dict[Expr, int] = {}
    inner: set[Expr] = set()
    for name, e in named.items():
        if e in shared and isinstance(e, Load) and e.dtype == dtypes[name]:
            roots[e] = roots.get(e, 0) + 1
        else:
            inner.update(x for x in e.walk() if x in shared)
    return {e: n for e, n in roots.items() if e not in inner}


def _gb(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} bytes"


def kept_between_uses(entries: list[Entry], named: dict[str, Expr], shared: set[Expr], budget: int) -> set[Expr]:
    """The shared expressions worth keeping from first to last use in write order: taken by first use while
    those kept at once fit `budget`. Uses close together (LLaMA-Pro's copied block, an upcycled FFN's E
    experts) are kept; uses far apart (SOLAR's repeated layers, 20 layers apart at 3B) are read again at
    each use, as plain copies the page cache serves, instead of holding many layers in memory."""
    spans: dict[Expr, tuple[int, int]] = {}
    for i, e in enumerate(entries):
        for u in written_units(named[e.name]):
            if u in shared:
                spans[u] = (spans.get(u, (i, i))[0], i)
    kept: set[Expr] = set()
    live: list[tuple[int, int]] = []  # (last use, bytes) of what is kept
    for u, (first, last) in sorted(spans.items(), key=lambda kv: kv[1]):
        live = [(end, n) for end, n in live if end >= first]
        size = u.numel * BYTES[u.dtype]
        if sum(n for _, n in live) + size <= budget:
            kept.add(u)
            live.append((last, size))
    return kept


GENERATION_CONFIG = "generation_config.json"


def _write_generation_config(g: Graph, config: dict, out: Path) -> str:
    """generation_config.json when the tokenizer source has none (a built-in tiny model, a folder without
    one): transformers' own GenerationConfig.from_model_config of config.json, read by the class it is
    written as (the generated code's config is a plain PretrainedConfig), saved as save_pretrained saves
    it. That is the token ids and the class's use_cache and output flags: a transformers 5 config holds no
    other generation field (its classes drop them from config.json), and so neither does compose's."""
    from transformers import AutoConfig, GenerationConfig, PretrainedConfig

    fields = {k: v for k, v in config.items() if k not in ("auto_map", "model_type")}
    model_config = (PretrainedConfig(**fields) if target(g).generated else
                    AutoConfig.for_model(config["model_type"], **fields))
    GenerationConfig.from_model_config(model_config).save_pretrained(out)
    if not (out / GENERATION_CONFIG).is_file():
        raise BuildError(f"{out}: transformers wrote no {GENERATION_CONFIG}")
    return GENERATION_CONFIG


def _copy_extra_files(g: Graph, out: Path, open_source) -> list[str]:
    """The tokenizer and generation config of the graph's tokenizer source: copied from that source, or
    written when it is a tokenizer built for the output (a merged vocabulary)."""
    ref = g.state.tokenizer
    if ref is None:
        return []
    if not isinstance(ref, str):
        return ref.write(out)
    copied = []
    for f in open_source(ref).extra_files():
        shutil.copyfile(f, out / f.name)
        copied.append(f.name)
    return copied
