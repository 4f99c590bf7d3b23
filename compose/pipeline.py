"""The front door: read a spec, lower it, run the passes, hand the graph to backends, write atomically."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

from compose.errors import BuildError, SpecError
from compose.spec import DTYPES, BuildSpec, parse_build_spec

FORMATS = ("hf", "torch", "onnx")


def load_spec(path: str | os.PathLike) -> BuildSpec:
    """A `.py` spec (its module-level `model`) or a `.yaml`/`.yml`/`.json` spec."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file")
    if p.suffix == ".py":
        import runpy

        try:
            ns = runpy.run_path(str(p), run_name="__compose_spec__")
        except SpecError as e:
            raise SpecError(f"{p}: {e}") from None
        except Exception as e:
            # The user's own Python failed: point at their line, not at compose's internals.
            import traceback

            frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == p.resolve()
                      or f.filename == str(p)]
            where = f" line {frames[-1].lineno}" if frames else ""
            raise SpecError(f"{p}{where}: {type(e).__name__}: {e}") from e
        if "model" not in ns:
            raise SpecError(f"{p}: defines no module-level `model`")
        return parse_build_spec({"model": ns["model"]}, str(p))
    if p.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise SpecError(f"{p}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        from compose.mergekit_config import is_mergekit_config, translate

        if is_mergekit_config(data):
            data = {"model": translate(data, str(p))}
        return parse_build_spec(data, str(p))
    raise SpecError(f"{p}: unknown spec type {p.suffix!r} (use .py, .yaml, .yml or .json)")


def as_build_spec(spec) -> BuildSpec:
    if isinstance(spec, BuildSpec):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        return load_spec(spec)
    return parse_build_spec({"model": spec}, "spec")


def lower_spec(spec):
    """The graph of `spec` straight after lowering (no passes), its sources opened afresh."""
    from compose.lower import lower
    from compose.sources import clear_cache, open_source

    clear_cache()
    return lower(as_build_spec(spec).model, open_source)


def compile_graph(spec, *, dtype: str | None = None, passes: Iterable[str] | None = None, verify_each: bool = False,
                  after: Callable[[str, object], None] | None = None):
    """Lower a spec and run the pass pipeline; `after(name, graph)` sees the IR after each stage."""
    from compose.passes import DEFAULT_PIPELINE, PassManager

    g = lower_spec(spec)
    if dtype:
        if dtype not in DTYPES:
            raise SpecError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        g = g.with_config(dtype=dtype)
    if after:
        after("lower", g)
    return PassManager(tuple(passes or DEFAULT_PIPELINE), verify_each=verify_each).run(g, after)


def build(spec, out: str | os.PathLike, *, formats: Iterable[str] = ("hf",), dtype: str | None = None,
          max_shard_size: str | int = "5GB", force: bool = False, progress: bool = True, workers: int | None = None,
          device: str = "cpu", dense_moe: bool = False) -> Path:
    """Build `spec` into the folder `out`. Written to a temporary folder and renamed into place: a failed
    build leaves nothing behind, and an existing `out` is replaced only with `force`."""
    from compose import __version__
    from compose.backends import hf
    from compose.manifest import manifest
    from compose.passes.manager import DEFAULT_PIPELINE
    from compose.sources import open_source

    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise BuildError(f"--format: unknown format {bad[0]!r} (choose from {', '.join(FORMATS)})")
    out = Path(out)
    if out.exists() and not force:
        raise BuildError(f"{out} already exists; pass --force to replace it")
    if workers is not None and workers < 1:
        raise BuildError(f"--workers: must be at least 1, got {workers}")
    workers = workers or min(4, os.cpu_count() or 1)
    if dense_moe and "onnx" not in formats:
        raise BuildError("--dense-moe: applies to the ONNX export; add onnx to --format")
    _check_device(device)
    spec = as_build_spec(spec)
    g = compile_graph(spec, dtype=dtype, verify_each=True)
    # A composite model (CALM, CogVLM) has no transformers class: its code is what config.json's auto_map
    # loads. ONNX is exported from the generated module, so it needs the code too. Rendered before any
    # weight is written, so a model the code cannot express is refused first.
    code = None
    if "torch" in formats or "onnx" in formats or g.composite:
        from compose.backends import torch as torch_backend

        code = torch_backend.render(g)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.compose-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        # The hf checkpoint is what every format loads its weights from, so it is always written.
        written = hf.write(g, tmp, open_source, max_shard_size=max_shard_size, progress=progress, workers=workers,
                           device=device)
        files = list(written["files"])
        if code is not None:
            files += torch_backend.write_files(code, tmp)
        onnx_record = None
        if "onnx" in formats:
            from compose.backends import onnx

            onnx_record = onnx.export(tmp, dense_moe=dense_moe)
            files += onnx_record["files"]
        record = manifest(g, version=__version__, spec=spec.model_dump(mode="json"), formats=formats,
                          passes=list(DEFAULT_PIPELINE), tensors=hf.tensors(g), trainable=hf.trainable_names(g),
                          shards=written["shards"], onnx=onnx_record, files=files)
        (tmp / "compose.json").write_text(json.dumps(record, indent=2) + "\n")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch

    try:
        d = torch.device(device)
    except RuntimeError:
        raise BuildError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise BuildError(f"--device: {device} asked for, but torch sees no CUDA device")
    if d.type not in ("cuda", "cpu"):
        raise BuildError(f"--device: {device} is not supported (cpu or cuda)")


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.compose-old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
