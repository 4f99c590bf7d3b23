"""The torch backend: a Graph -> modeling_compose.py (and, for composite models, the modules it imports),
standalone PyTorch for the weights beside it.

It writes code only; the hf backend writes the checkpoint that `ComposeForCausalLM.from_pretrained` reads.
`load_module` imports a build's generated module back (for the onnx backend and the runtime).
"""
from __future__ import annotations

import hashlib
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


_WRITTEN: dict[Path, dict[str, str]] = {}
"""Folder -> file name -> sha256 of the code this process wrote there. A build being written has no
compose.json yet, and its ONNX export loads the code just written: checked against these."""


def write_files(files: dict[str, str], out_dir: Path) -> list[str]:
    """Write rendered files into `out_dir` (an existing folder); return the file names written."""
    written = _WRITTEN[Path(out_dir).resolve()] = {}  # only this call's files: nothing older is vouched for
    for name, source in files.items():
        data = source.encode("utf-8")
        (Path(out_dir) / name).write_bytes(data)
        written[name] = hashlib.sha256(data).hexdigest()
    return sorted(files)


def write(graph: Graph, out_dir: Path) -> list[str]:
    """Render and write the generated module(s) into `out_dir`; return the file names written."""
    return write_files(render(graph), out_dir)


def load_module(folder: Path):
    """The generated modeling_compose.py of a build, executed from bytes read once and checked against the
    sha256 compose.json records (or, in a build being written, against what this process wrote): the code
    that runs is the code that was checked. Nothing is imported by path: Python's import would read and
    write __pycache__, whose bytecode it runs in place of the source when the source's size and mtime
    match, so a planted cache would bypass the check.

    A composite's module imports its siblings (`from .modeling_compose_anchor import ...`): it is made a
    package with no folder on disk whose submodules are those siblings, each checked and executed first.
    The package is named from the code itself: the exporter writes the module's name into what it records,
    so a name from the folder or the process (hash() of a str is salted per process) would make two
    identical builds differ."""
    folder = Path(folder)
    if not (folder / FILENAME).is_file():
        raise BuildError(f"{folder}: no {FILENAME} ({_why_none(folder)})")
    sources = _checked_sources(folder, _recorded(folder))
    name = f"compose_generated_{_code_hash(sources)}"
    if name not in sys.modules:
        _execute(name, folder, sources)
    return sys.modules[name]


def _why_none(folder: Path) -> str:
    """What to do about a build without generated code: rebuild with it, unless its family is derived from
    transformers' class (compose.families.derived), which has none."""
    from compose import families
    from compose.backends.record import manifest_of

    target = manifest_of(folder).get("target", {})
    t = target.get("model_type") if isinstance(target, dict) else None
    if isinstance(t, str) and t not in families.REGISTRY and families.derived.known(t):
        return (f"model_type {t} is written as transformers' {target.get('class')}, by a family derived from that "
                "class, which has no generated module: load it with transformers")
    return "build with --format torch, or rebuild"


def _recorded(folder: Path) -> dict[str, str]:
    """The sha256 the folder's code must have: compose.json's, or what this process wrote there."""
    from compose.backends.record import MANIFEST, recorded_hashes

    if (folder / MANIFEST).exists() or folder.resolve() not in _WRITTEN:
        return recorded_hashes(folder)  # refuses a folder without compose.json
    return _WRITTEN[folder.resolve()]


def _checked_sources(folder: Path, hashes: dict[str, str]) -> dict[str, bytes]:
    """Module name -> checked bytes: modeling_compose and every sibling it imports, its imports first."""
    from compose.backends.record import read_checked

    sources: dict[str, bytes] = {}

    def visit(module: str) -> None:
        path = folder / f"{module}.py"
        if module in sources:
            return
        if not path.is_file():
            raise BuildError(f"{path}: missing (imported by the generated code; rebuild)")
        sources[module] = code = read_checked(path, hashes)
        for sibling in _relative_imports(path, code):
            visit(sibling)
        sources[module] = sources.pop(module)  # after its imports: the order to execute in

    visit(FILENAME.removesuffix(".py"))
    return sources


def _relative_imports(path: Path, code: bytes) -> list[str]:
    """The sibling modules `code` imports as `from .name import ...`."""
    import ast

    tree = _parsed(path, code, ast.parse)
    return sorted({n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module})


def _parsed(path: Path, code: bytes, parse):
    try:
        return parse(code, str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise BuildError(f"{path}: not valid Python ({type(e).__name__}: {e})") from None


def _execute(name: str, folder: Path, sources: dict[str, bytes]) -> None:
    """Execute `sources` (in order, the main module last) as the package `name` and its submodules."""
    import importlib.machinery
    import types

    main = FILENAME.removesuffix(".py")
    registered = []
    try:
        for module, code in sources.items():
            path = folder / f"{module}.py"
            full = name if module == main else f"{name}.{module}"
            # dont_inherit: this file's own `from __future__` flags must not change how the code compiles.
            compiled = _parsed(path, code, lambda c, p: compile(c, p, "exec", dont_inherit=True))
            m = types.ModuleType(full)
            m.__file__ = str(path)
            m.__spec__ = importlib.machinery.ModuleSpec(full, None, origin=str(path), is_package=module == main)
            if module == main:
                m.__path__ = []  # a package no finder can look into: its submodules are only the ones set here
            m.__package__ = name
            sys.modules[full] = m  # before it runs: dataclasses and relative imports look it up there
            registered.append(full)
            exec(compiled, m.__dict__)
    except BaseException:
        for full in registered:
            sys.modules.pop(full, None)
        raise


def _code_hash(sources: dict[str, bytes]) -> str:
    """A digest of the generated modules that run (a composite's main module imports its siblings, so
    equal main files alone do not make equal modules)."""
    digest = hashlib.sha256()
    for module in sorted(sources):
        code = sources[module]
        digest.update(f"{module}.py\0{len(code)}\0".encode() + code)
    return digest.hexdigest()[:16]


def kind(module) -> str:
    """What a generated module holds: `calm`, `cogvlm`, or `single` (one model: dense, merged or MoE)."""
    return "calm" if hasattr(module, "calm_forward") else "cogvlm" if hasattr(module, "cogvlm_forward") else "single"
