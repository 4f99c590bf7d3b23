"""The hf backend: a verified Graph -> config.json + sharded safetensors for the class the target pass chose.

The target family (compose.families) names every tensor and writes config.json; this module only
evaluates and writes, one tensor at a time (see shards.py and ir/evaluate.py). The caller owns the output
folder's atomicity (compose.build writes into a temporary folder and renames it into place).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from compose import families
from compose.errors import BuildError
from compose.ir import Graph, Load
from compose.ir.evaluate import Evaluator, torch_dtype
from compose.ir.weights import Expr
from compose.backends.finite import FiniteCheck
from compose.backends.shards import (Entry, RawCopy, Releaser, parse_size, plan_shards, prefetch, shard_names,
                                     write_index, write_shard)


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
          workers: int = 2, device: str = "cpu", allow_nonfinite: bool = False) -> dict:
    """Write weights and config into `out` (an existing empty folder); return what was written.

    `open_source` resolves a Load's source reference to the opened source (the front door's). `workers`
    tensors are computed ahead of the writer on threads; `device` is where merges compute (`cuda` for a
    GPU); what is written always goes through the CPU. Every tensor is checked finite (see `finite`):
    a non-finite source tensor is an error unless `allow_nonfinite` (then a warning names them all).
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
    check = FiniteCheck(allow_nonfinite)
    evaluate = Evaluator(named.values(), lambda e: check.source(e, open_source(e.source).tensor(e.key)),
                         device=device)

    def produce(e: Entry):
        expr = named[e.name]
        if isinstance(expr, Load) and expr.dtype == dtype:  # a plain copy: the stored bytes, never decoded
            span = open_source(expr.source).span(expr.key)
            if span is not None:
                return RawCopy(*span, check=check.raw(expr))
        return check.output(e.name, expr, evaluate(expr).to(device="cpu", dtype=tdtype))

    total = sum(e.nbytes for e in entries)
    sha: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", disable=not progress,
              leave=False) as bar:
        stream = prefetch(entries, produce, workers, cost=lambda e: costs[e.name], budget=1.25 * max(costs.values()))
        release = Releaser()
        try:
            for fname, shard in zip(files, shards):
                sha[fname] = write_shard(out / fname, shard, stream, bar.update, done=release)
        finally:
            release.wait()
    if len(files) > 1:
        write_index(out / "model.safetensors.index.json",
                    {e.name: f for f, shard in zip(files, shards) for e in shard}, total)
    (out / "config.json").write_text(json.dumps(hf_config(g), indent=2, sort_keys=True) + "\n")
    check.warn()
    copied = _copy_extra_files(g, out, open_source)
    return {"shards": sha, "files": sorted(files + copied + ["config.json"]), "total_bytes": total}


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
