"""The torch backend: a Graph -> modeling_compose.py (and, for composite models, the modules it imports),
standalone PyTorch for the weights beside it.

It writes code only; the hf backend writes the checkpoint that `ComposeForCausalLM.from_pretrained` reads.
"""
from __future__ import annotations

from pathlib import Path

from compose.codegen import render_files
from compose.ir import Graph

FILENAME = "modeling_compose.py"


def write(graph: Graph, out_dir: Path) -> list[str]:
    """Write the generated module(s) into `out_dir` (an existing folder); return the file names written."""
    files = render_files(graph)
    for name, source in files.items():
        (Path(out_dir) / name).write_text(source)
    return sorted(files)
