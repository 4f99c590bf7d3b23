"""The graph as Graphviz DOT: one box per node, new blocks green, frozen nodes grey, dropped ones dashed.

Every id and label is written as a quoted string (`_quoted`), so a node name or a source ref (a folder
may be named with quotes, backslashes, newlines) is one string to Graphviz and cannot close it to add
attributes or statements."""
from __future__ import annotations

import json

from compose.ir.graph import CROSS, Graph
from compose.ir.nodes import DecoderBlock


def to_dot(g: Graph) -> str:
    lines = ["digraph compose {", "  rankdir=TB;", '  node [shape=box, fontname="monospace"];']
    dead = set(g.dead())
    for name, op in g.items():
        label = [name]
        style = ["filled"]
        color = "white"
        if isinstance(op, DecoderBlock):
            label.append(op.origin.describe(lambda ref: ref.split("?")[0]))
        if getattr(op, "identity", None):
            label.append("identity at init")
        if op.trainable is not None:
            color = "palegreen" if op.trainable else "lightgrey"
        if name in dead:
            style.append("dashed")
        label = _quoted("\n".join(label))
        lines.append(f'  {_quoted(name)} [label={label}, style="{",".join(style)}", fillcolor="{color}"];')
    for a, b, kind in g.edges():
        style = ' [style=dashed, color=blue, label="cross"]' if kind == CROSS else ""
        lines.append(f"  {_quoted(a)} -> {_quoted(b)}{style};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """`text` as a DOT quoted string. JSON's string escapes are ones DOT reads safely: `\\"` is DOT's only
    escape (a quote that does not close the string), `\\\\` stays a backslash pair that cannot escape the
    closing quote, and control characters are escaped, a newline as `\\n`, which a label shows as a line
    break."""
    return json.dumps(text, ensure_ascii=False)
