"""The torch backend: a Graph -> modeling_compose.py, a standalone PyTorch module for the weights beside it.

It writes code only; the hf backend writes the checkpoint that `ComposeForCausalLM.from_pretrained` reads.
"""
from __future__ import annotations

from pathlib import Path

from compose.codegen import render_modeling
from compose.ir import Graph

FILENAME = "modeling_compose.py"


def write(graph: Graph, out_dir: Path) -> list[str]:
    """Write modeling_compose.py into `out_dir` (an existing folder); return the file names written."""
    (Path(out_dir) / FILENAME).write_text(render_modeling(graph))
    return [FILENAME]
