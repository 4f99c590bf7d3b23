"""The IR as text: one header line per node, then where each of its weights comes from.

A block whose weights all load from one source layer under the same names prints as one line
(`* <- %0:model.layers.3.*`); only the weights that differ (zeros, slices, merges) are listed. Sources
get short aliases (%0, %1, ...) in order of first use, so dumps are stable and diff well as golden files.
"""
from __future__ import annotations

import hashlib

from compose.ir.graph import Graph
from compose.ir.nodes import DecoderBlock, Op
from compose.ir.weights import Concat, Expr, Load, Merge, Noise, Scale, Slice, Zeros


class _Aliases(dict):
    def of(self, ref: str) -> str:
        if ref not in self:
            self[ref] = f"%{len(self)}"
        return self[ref]


def format_expr(e: Expr, aliases: _Aliases) -> str:
    if isinstance(e, Load):
        return f"{aliases.of(e.source)}:{e.key}"
    if isinstance(e, Zeros):
        return str(e)
    if isinstance(e, Slice):
        return f"slice({format_expr(e.x, aliases)}, dim={e.dim}, {e.start}:{e.stop})"
    if isinstance(e, Concat):
        return f"concat([{', '.join(format_expr(x, aliases) for x in e.inputs)}], dim={e.dim})"
    if isinstance(e, Scale):
        return f"scale({format_expr(e.x, aliases)}, {e.factor!r})"
    if isinstance(e, Noise):
        return f"noise({format_expr(e.x, aliases)}, std={e.std!r}, seed={e.seed})"
    if isinstance(e, Merge):
        ps = "".join(f", {k}={v!r}" for k, v in e.params)
        return f"merge.{e.method}([{', '.join(format_expr(x, aliases) for x in e.inputs)}]{ps})"
    raise TypeError(f"unknown expression {type(e).__name__}")


def _common_load_prefix(params: dict[str, Expr]) -> tuple[str, str] | None:
    """(source, prefix) when most weights are `load(source, prefix + local_name)`."""
    counts: dict[tuple[str, str], int] = {}
    for k, e in params.items():
        if isinstance(e, Load) and e.key.endswith(k):
            sp = (e.source, e.key[: len(e.key) - len(k)])
            counts[sp] = counts.get(sp, 0) + 1
    if not counts:
        return None
    best = max(counts.items(), key=lambda kv: kv[1])
    return best[0] if best[1] > 1 else None


def _annotations(op: Op) -> str:
    notes = []
    if op.trainable is not None:
        notes.append("trainable" if op.trainable else "frozen")
    if isinstance(op, DecoderBlock) and op.identity:
        notes.append("identity at init")
    return f"  [{', '.join(notes)}]" if notes else ""


def format_node(name: str, op: Op, aliases: _Aliases) -> list[str]:
    if isinstance(op, DecoderBlock):
        # Hyper-parameters are the graph's (checked by the verifier); the block line says where it came from.
        o = op.origin
        head = f"%{name} = DecoderBlock({'new copy of' if o.new else 'from'} {aliases.of(o.source)} layer {o.layer})"
    else:
        head = f"%{name} = {op.kind}({op.attrs()})"
    lines = [head + _annotations(op)]
    params = op.params()
    common = _common_load_prefix(params)
    if common:
        lines.append(f"    * <- {aliases.of(common[0])}:{common[1]}*")
    for k, e in params.items():
        if common and isinstance(e, Load) and (e.source, e.key) == (common[0], common[1] + k):
            continue
        lines.append(f"    {k} <- {format_expr(e, aliases)}")
    return lines


def print_graph(g: Graph) -> str:
    aliases = _Aliases()
    body: list[str] = []
    for name in g.chain():
        body.extend(format_node(name, g.op(name), aliases))
    dead = g.dead()
    if dead:
        body.append("// off the chain: never read unless dead-weight elimination keeps them")
        for name in dead:
            body.extend(format_node(name, g.op(name), aliases))
    for k in sorted(g.meta):
        if k == "dropped":
            body.append("meta dropped = " + ", ".join(f"{aliases.of(src)} layer {i}" for src, i in g.meta[k]))
        elif k != "cost":
            body.append(f"meta {k} = {g.meta[k]}")
    lines = [f"graph {g.config.describe()}"]
    lines += [f"source {a} = {ref}" for ref, a in aliases.items()]
    lines += body
    return "\n".join(lines) + "\n"


def graph_hash(g: Graph) -> str:
    """sha256 of the printed IR and the source config: equal hashes build the same model."""
    return hashlib.sha256((print_graph(g) + g.config.hf_config).encode()).hexdigest()
