"""The IR as text: one header line per node, then where each of its weights comes from.

A block whose weights all load from one source layer under the same names prints as one line
(`* <- %0:model.layers.3.*`); only the weights that differ (zeros, slices, merges) are listed. Sources
get short aliases (%0, %1, ...) in order of first use, so dumps are stable and diff well as golden files.
"""
from __future__ import annotations

import hashlib
from collections import Counter

from compose.ir.graph import CROSS, Graph
from compose.ir.nodes import DecoderBlock, Layer, MoE, Op
from compose.ir.state import Fusion
from compose.ir.weights import (Concat, Const, Expr, Load, LowRank, Merge, Noise, Ones, Rows, Scale, Select, Slice, Stack,
                                Zeros)


class _Aliases(dict):
    def of(self, ref: str) -> str:
        if ref not in self:
            self[ref] = f"%{len(self)}"
        return self[ref]


def format_expr(e: Expr, aliases: _Aliases) -> str:
    if isinstance(e, Load):
        return f"{aliases.of(e.source)}:{e.key}"
    if isinstance(e, (Zeros, Ones, Const)):
        return str(e)
    if isinstance(e, Slice):
        return f"slice({format_expr(e.x, aliases)}, dim={e.dim}, {e.start}:{e.stop})"
    if isinstance(e, Select):
        return f"{format_expr(e.x, aliases)}[{e.index}]"
    if isinstance(e, Concat):
        return f"concat([{', '.join(format_expr(x, aliases) for x in e.inputs)}], dim={e.dim})"
    if isinstance(e, Stack):
        return f"stack([{', '.join(format_expr(x, aliases) for x in e.inputs)}])"
    if isinstance(e, Scale):
        return f"scale({format_expr(e.x, aliases)}, {e.factor!r})"
    if isinstance(e, Noise):
        return f"noise({format_expr(e.x, aliases)}, std={e.std!r}, seed={e.seed})"
    if isinstance(e, LowRank):
        t = ", transpose" if e.transpose else ""
        return (f"lora({format_expr(e.x, aliases)}, A={format_expr(e.a, aliases)}, B={format_expr(e.b, aliases)}, "
                f"scale={e.scale!r}{t})")
    if isinstance(e, Merge):
        s = e.settings()
        return f"{e.method}([{', '.join(format_expr(x, aliases) for x in e.inputs)}]{', ' + s if s else ''})"
    if isinstance(e, Rows):
        return f"rows([{', '.join(format_expr(x, aliases) for x in e.inputs)}], {e.settings()})"
    raise TypeError(f"unknown expression {type(e).__name__}")


def _pattern(k: str, e: Expr):
    """A weight's source with its own name factored out (`load(%0, model.layers.3.` + k + `)`), so the
    weights of a block that share one can print as one `*` line; None when it has none."""
    if isinstance(e, Load) and e.key.endswith(k):
        return ("load", e.source, e.key[: len(e.key) - len(k)])
    if isinstance(e, Merge) and e.inputs and all(isinstance(x, Load) and x.key.endswith(k) for x in e.inputs):
        ins = tuple((x.source, x.key[: len(x.key) - len(k)]) for x in e.inputs)
        return ("merge", e.method, e.base, e.params, e.compute, e.seed is not None, ins)
    return None


def _format_pattern(p, aliases: _Aliases) -> str:
    if p[0] == "load":
        return f"{aliases.of(p[1])}:{p[2]}*"
    _, method, base, params, compute, seeded, ins = p
    settings = Merge(method, (), base, params, compute=compute).settings()
    settings += ", seed per tensor" if seeded else ""
    inputs = ", ".join(f"{aliases.of(src)}:{prefix}*" for src, prefix in ins)
    return f"{method}([{inputs}]{', ' + settings.lstrip(', ') if settings else ''})"


def _annotations(op: Op) -> str:
    notes = []
    if op.trainable is not None:
        notes.append("trainable" if op.trainable else "frozen")
    if getattr(op, "identity", None):
        notes.append("identity at init")
    vision = getattr(op, "vision", None)
    if vision is not None and vision.trainable is not None and vision.trainable != op.trainable:
        notes.append(f"visual expert {'trainable' if vision.trainable else 'frozen'}")
    return f"  [{', '.join(notes)}]" if notes else ""


def _expert_lines(moe: MoE, aliases: _Aliases) -> list[str]:
    """Experts print one line each when their weights load under their own names from one prefix
    (`mlp.experts.3.* <- %0:model.layers.3.mlp.*`), and runs of experts that print alike share a line."""
    def lines(x) -> list[tuple[str, str]]:
        params = x.params()
        pats = {_pattern(k, e) for k, e in params.items()}
        if len(pats) == 1 and None not in pats:
            return [("*", _format_pattern(pats.pop(), aliases))]
        return [(k, format_expr(e, aliases)) for k, e in params.items()]

    runs: list[tuple[list[int], list[tuple[str, str]]]] = []
    for i, x in enumerate(moe.experts):
        mine = lines(x)
        if runs and runs[-1][1] == mine:
            runs[-1][0].append(i)
        else:
            runs.append(([i], mine))
    out = []
    for idx, mine in runs:
        which = str(idx[0]) if len(idx) == 1 else f"{{{idx[0]}..{idx[-1]}}}"
        out += [f"    mlp.experts.{which}.{k} <- {v}" for k, v in mine]
    return out


def format_node(name: str, op: Op, aliases: _Aliases) -> list[str]:
    if isinstance(op, DecoderBlock):
        # Hyper-parameters are the graph's (checked by the verifier); the block line says where it came from.
        o = op.origin
        window = f", window={op.attn.window}" if op.attn.window is not None else ""
        head = f"%{name} = DecoderBlock({'' if o.new or o.method else 'from '}{o.describe(aliases.of)}{window})"
    elif isinstance(op, Layer):
        o = op.origin
        fields = "".join(f", {k}={v}" for k, v in op.fields) + (f", read by {op.family}" if op.family else "")
        head = f"%{name} = Layer({'' if o.new or o.method else 'from '}{o.describe(aliases.of)}{fields})"
    else:
        head = f"%{name} = {op.kind}({op.attrs()})"
    lines = [head + _annotations(op)]
    params = op.params()
    moe = op.ffn if isinstance(op, DecoderBlock) and isinstance(op.ffn, MoE) else None
    if moe is not None:
        lines.append(f"    mlp = MoE({moe.attrs()})")
        params = {k: e for k, e in params.items() if not k.startswith("mlp.experts.")}
    vision = op.vision if isinstance(op, DecoderBlock) else None
    if vision is not None and all(params.get(k) == e for k, e in vision.params().items()):
        # CogVLM's init: the visual expert is the language weights (the same expressions, read once each).
        lines.append("    vision_expert.* <- the block's own self_attn.{q,k,v,o}_proj and mlp.* (copies)")
        params = {k: e for k, e in params.items() if not k.startswith("vision_expert.")}
    patterns = {k: _pattern(k, e) for k, e in params.items()}
    counts = Counter(p for p in patterns.values() if p is not None)
    common = counts.most_common(1)[0][0] if counts and counts.most_common(1)[0][1] > 1 else None
    if common:
        lines.append(f"    * <- {_format_pattern(common, aliases)}")
    for k, e in params.items():
        if common is None or patterns[k] != common:
            lines.append(f"    {k} <- {format_expr(e, aliases)}")
    return lines + (_expert_lines(moe, aliases) if moe is not None else [])


def state_lines(g: Graph, aliases: _Aliases) -> list[str]:
    """The graph's records (compose.ir.state), one `state <name> = ...` line each; the cost is the CLI
    summary's to print. `identity blocks` is derived from the nodes' own marks."""
    s = g.state
    out = [f"state train = {s.train}"]
    if s.tokenizer is not None:
        out.append(f"state tokenizer = {aliases.of(s.tokenizer) if isinstance(s.tokenizer, str) else s.tokenizer}")
    if s.moe is not None:
        out.append(f"state moe = {s.moe.describe()}")
    if s.calm is not None:
        augment = aliases.of(s.calm.augment) if s.calm.augment != "composed" else "composed"
        out.append(f"state calm = pairs {list(s.calm.pairs)}, augment {augment}")
    if s.dropped:
        out.append("state dropped = " + ", ".join(f"{aliases.of(src)} layer {i}" for src, i in s.dropped))
    marked = [n for n, op in g.items() if getattr(op, "identity", None) is not None]
    if marked:
        ids = [n for n in marked if g.op(n).identity]
        out.append(f"state identity blocks = {', '.join(ids) or 'none'}")
    if s.target is not None:
        out.append(f"state target = {s.target.family} ({s.target.architecture})")
    if s.shared:
        n = sum(len(x.names) for x in s.shared)
        out.append(f"state shared = {len(s.shared)} expressions used by {n} tensors")
        out += _shared_lines(s.shared, aliases)
    if s.fusion != Fusion():
        out.append(f"state fusion = {s.fusion.describe()}")
    return out


def _shared_lines(shared, aliases: _Aliases) -> list[str]:
    """One line per shared expression, except that loads written under their own names in other places
    (LLaMA-Pro's copied block, CogVLM's visual expert) print as one line per block:
    `%0:model.layers.1.* -> model.layers.{1..2}.* (input_layernorm.weight, ...)`."""
    groups: dict[tuple, list[str]] = {}
    lines: list[tuple | str] = []
    for x in shared:
        e = x.expr
        tail = _common_tail([e.key, *x.names]) if isinstance(e, Load) else ""
        if tail.count(".") < 1:
            lines.append(f"    {format_expr(e, aliases)} -> {name_set(x.names)}")
            continue
        key = (e.source, e.key[: len(e.key) - len(tail)], tuple(n[: len(n) - len(tail)] for n in x.names))
        if key not in groups:
            groups[key] = []
            lines.append(key)
        groups[key].append(tail)
    out = []
    for line in lines:
        if isinstance(line, str):
            out.append(line)
            continue
        source, prefix, targets = line
        out.append(f"    {aliases.of(source)}:{prefix}* -> {name_set(tuple(t + '*' for t in targets))} "
                   f"({', '.join(groups[line])})")
    return out


def _common_tail(names: list[str]) -> str:
    """The longest dotted suffix every name ends with (`self_attn.q_proj.weight`), never a whole name."""
    parts = [n.split(".") for n in names]
    k = 0
    while all(len(p) > k + 1 for p in parts) and len({p[-1 - k] for p in parts}) == 1:
        k += 1
    return ".".join(parts[0][len(parts[0]) - k:]) if k else ""


def name_set(names: tuple[str, ...]) -> str:
    """Names that differ in one dotted field only, as one (`...experts.{0..3}.w1`, `...{0,2}...`); a name
    repeated (one stacked tensor holding the expression several times) counted (`...gate_up_proj x4`)."""
    counts = Counter(names)
    distinct = list(counts)
    if len(distinct) == 1:
        return f"{distinct[0]} x{counts[distinct[0]]}"
    split = [n.split(".") for n in distinct]
    differ = [i for i in range(len(split[0])) if len({len(p) for p in split}) == 1 and len({p[i] for p in split}) > 1]
    if len({len(p) for p in split}) != 1 or len(differ) != 1 or set(counts.values()) != {1}:
        return ", ".join(f"{n} x{c}" if c > 1 else n for n, c in counts.items())
    i = differ[0]
    values = [p[i] for p in split]
    run = all(v.isdigit() for v in values) and [int(v) - int(values[0]) for v in values] == list(range(len(values)))
    if run:
        field = f"{{{values[0]}..{values[-1]}}}"
    else:
        field = "{" + ",".join(values) + "}"
    return ".".join(split[0][:i] + [field] + split[0][i + 1:])


def print_graph(g: Graph) -> str:
    aliases = _Aliases()
    body: list[str] = []
    for name in g.chain():
        body.extend(format_node(name, g.op(name), aliases))
    dead = g.dead()
    for prefix, side in g.side_chains().items():
        body.append(f"// side chain {prefix}: {g.side_configs[prefix].describe()}")
        for name in side:
            if name not in dead:
                body.extend(format_node(name, g.op(name), aliases))
    shown = set(g.chain()) | {n for side in g.side_chains().values() for n in side} | set(dead)
    for name in g.names():
        if name not in shown:  # live inputs off the chains (CogVLM's vision adapter)
            body.extend(format_node(name, g.op(name), aliases))
    crosses = [f"{a} -> {b}" for a, b, kind in g.edges() if kind == CROSS]
    if crosses:
        body.append("cross edges: " + ", ".join(crosses))
    if dead:
        body.append("// off the chain: never read unless dead-weight elimination keeps them")
        for name in dead:
            body.extend(format_node(name, g.op(name), aliases))
    body += state_lines(g, aliases)
    lines = [f"graph {g.config.describe()}"]
    lines += [f"source {a} = {ref}" for ref, a in aliases.items()]
    lines += body
    return "\n".join(lines) + "\n"


def graph_hash(g: Graph) -> str:
    """sha256 of the printed IR and the whole model config (the carried fields too): equal hashes build
    the same model."""
    configs = [repr(g.config)] + [repr(c) for _, c in sorted(g.side_configs.items())]
    return hashlib.sha256((print_graph(g) + "\n".join(configs)).encode()).hexdigest()
