"""The torch backend: a Graph -> modeling_compose.py (and, for composite models, the modules it imports),
standalone PyTorch for the weights beside it.

It writes code only; the hf backend writes the checkpoint that `ComposeForCausalLM.from_pretrained` reads.
`load_module` imports a build's generated module back (for the onnx backend and the runtime).
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from compose.codegen import render_files
from compose.errors import BuildError
from compose.ir import Graph

FILENAME = "modeling_compose.py"


def render(graph: Graph) -> dict[str, str]:
    """File name -> source of the generated module(s): every check the code makes runs here, so a caller
    can render before it writes anything else."""
    return render_files(graph)


def write_files(files: dict[str, str], out_dir: Path) -> list[str]:
    """Write rendered files into `out_dir` (an existing folder); return the file names written."""
    for name, source in files.items():
        (Path(out_dir) / name).write_text(source)
    return sorted(files)


def write(graph: Graph, out_dir: Path) -> list[str]:
    """Render and write the generated module(s) into `out_dir`; return the file names written."""
    return write_files(render(graph), out_dir)


def load_module(folder: Path):
    """The generated modeling_compose.py of a build, imported under a name made from the generated code
    itself: the exporter writes the module's name into what it records, so a name from the folder or the
    process (hash() of a str is salted per process) would make two identical builds differ."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        raise BuildError(f"{folder}: no {FILENAME} (build with --format torch, or rebuild)")
    name = f"compose_generated_{_code_hash(Path(folder))}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _code_hash(folder: Path) -> str:
    """A digest of every generated module in `folder` (a composite's main module imports its siblings by
    path, so equal main files alone do not make equal modules)."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob("modeling_compose*.py")):
        code = path.read_bytes()
        digest.update(f"{path.name}\0{len(code)}\0".encode() + code)
    return digest.hexdigest()[:16]


def kind(module) -> str:
    """What a generated module holds: `calm`, `cogvlm`, or `single` (one model: dense, merged or MoE)."""
    return "calm" if hasattr(module, "calm_forward") else "cogvlm" if hasattr(module, "cogvlm_forward") else "single"
