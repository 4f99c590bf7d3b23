"""The graph as Graphviz DOT: one box per node, new blocks green, frozen nodes grey, dropped ones dashed."""
from __future__ import annotations

from compose.ir.graph import CROSS, Graph
from compose.ir.nodes import DecoderBlock


def to_dot(g: Graph) -> str:
    lines = ["digraph compose {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    dead = set(g.dead())
    for name, op in g.items():
        label = name
        style = ["filled"]
        color = "white"
        if isinstance(op, DecoderBlock):
            label += "\\n" + op.origin.describe(lambda ref: ref.split("?")[0])
        if getattr(op, "identity", None):
            label += "\\nidentity at init"
        if op.trainable is not None:
            color = "palegreen" if op.trainable else "lightgrey"
        if name in dead:
            style.append("dashed")
        lines.append(f'  "{name}" [label="{label}", style="{",".join(style)}", fillcolor="{color}"];')
    for a, b, kind in g.edges():
        style = ' [style=dashed, color=blue, label="cross"]' if kind == CROSS else ""
        lines.append(f'  "{a}" -> "{b}"{style};')
    lines.append("}")
    return "\n".join(lines) + "\n"
