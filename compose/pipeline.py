"""The front door: read a spec, lower it, run the passes, hand the graph to backends, write atomically."""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable

from compose.errors import BuildError, SpecError
from compose.spec import DTYPES, BuildSpec, parse_build_spec

FORMATS = ("hf", "torch", "onnx", "gguf")
MAX_SPEC_BYTES = 16 << 20


def load_spec(path: str | os.PathLike) -> BuildSpec:
    """A `.py` spec (its module-level `model`) or a `.yaml`/`.yml`/`.json` spec."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: no such spec file")
    if p.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(f"{p}: {p.stat().st_size} bytes is too large for a spec (at most {MAX_SPEC_BYTES})")
    if p.suffix == ".py":
        import runpy

        cwd = os.getcwd()
        try:
            ns = runpy.run_path(str(p), run_name="__compose_spec__")
        except SpecError as e:
            raise SpecError(f"{p}: {e}") from None
        except (Exception, SystemExit) as e:
            # The user's own Python failed, or called sys.exit (which must not end compose, least of all
            # with status 0 and nothing built): point at their line, not at compose's internals. A Ctrl-C
            # (KeyboardInterrupt) stays an interrupt.
            import traceback

            frames = [f for f in traceback.extract_tb(e.__traceback__) if Path(f.filename) == p.resolve()
                      or f.filename == str(p)]
            where = f" line {frames[-1].lineno}" if frames else ""
            what = (f"the spec exits (SystemExit({e.code!r})) instead of defining `model`"
                    if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}")
            raise SpecError(f"{p}{where}: {what}") from e
        finally:
            os.chdir(cwd)  # a spec that changes directory must not change where sources and outputs are
        if "model" not in ns:
            raise SpecError(f"{p}: defines no module-level `model`")
        return parse_build_spec({"model": ns["model"]}, str(p))
    if p.suffix in (".yaml", ".yml", ".json"):
        import yaml

        try:
            data = yaml.load(p.read_text(), Loader=_spec_loader())
        except _DuplicateKey as e:
            raise SpecError(f"{p} line {e.line}: duplicate key {e.key!r} (a key may appear once in a mapping)") \
                from None
        except yaml.YAMLError as e:
            raise SpecError(f"{p}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
        except RecursionError:
            raise SpecError(f"{p}: nested too deeply to be a spec") from None
        from compose import mergekit_config, mergekit_moe_config

        if mergekit_config.is_mergekit_config(data):
            data = {"model": mergekit_config.translate(data, str(p))}
        elif mergekit_moe_config.is_mergekit_moe_config(data):
            data = {"model": mergekit_moe_config.translate(data, str(p))}
        try:
            return parse_build_spec(data, str(p))
        except RecursionError:
            raise SpecError(f"{p}: nested too deeply to be a spec") from None
    raise SpecError(f"{p}: unknown spec type {p.suffix!r} (use .py, .yaml, .yml or .json)")


@functools.cache
def _spec_loader():
    import yaml

    class SpecLoader(yaml.SafeLoader):
        """yaml.safe_load's loader, but a mapping that gives one key twice is refused: PyYAML (and JSON
        parsers) silently keep the last, so `weight: 0.3` written twice would build with the other value.
        Merge keys (`<<: *anchor`) are not duplicates: the mapping's own keys win over merged ones."""

        def __init__(self, stream):
            super().__init__(stream)
            self.checked: set[int] = set()

        def flatten_mapping(self, node):
            # Flattening puts the merged pairs before the mapping's own ones (and rewrites node.value,
            # which a mapping merged twice meets again): the own ones are checked once, the first time.
            first = id(node) not in self.checked
            self.checked.add(id(node))
            own = sum(k.tag != "tag:yaml.org,2002:merge" for k, _ in node.value)
            super().flatten_mapping(node)
            if not first:
                return
            seen = set()
            for key_node, _ in node.value[len(node.value) - own:]:
                key = self.construct_object(key_node)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark.line + 1)
                    seen.add(key)
                except TypeError:  # an unhashable key: the base constructor refuses it with its own error
                    pass

    return SpecLoader


class _DuplicateKey(Exception):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


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
          device: str = "cpu", dense_moe: bool = False, max_output_size: str | int | None = None,
          allow_nonfinite: bool = False, fuse: bool = True, max_memory: str | int | None = None) -> Path:
    """Build `spec` into the folder `out` under the output protocol (compose.output): locked, written to a
    temporary folder and renamed into place; a failed build leaves nothing behind, and an existing `out`
    is replaced only with `force`, and only if it is still what was there at the start. `fuse=False`
    skips the fusion passes (the generated code keeps the checkpoint's separate projections)."""
    from compose.backends.shards import parse_size
    from compose.passes import DEFAULT_PIPELINE, FUSION
    from compose.output import OutputFolder, absolute

    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise BuildError(f"--format: unknown format {bad[0]!r} (choose from {', '.join(FORMATS)})")
    if workers is not None and workers < 1:
        raise BuildError(f"--workers: must be at least 1, got {workers}")
    workers = workers or min(4, os.cpu_count() or 1)
    if dense_moe and "onnx" not in formats:
        raise BuildError("--dense-moe: applies to the ONNX export; add onnx to --format")
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
    limit = None if max_output_size is None else parse_size(max_output_size, "--max-output-size")
    memory = None if max_memory is None else parse_size(max_memory, "--max-memory")
    check_device(device)
    out = absolute(out)  # before the spec runs: a spec that changes directory must not move the output
    if isinstance(spec, (str, os.PathLike)):
        _check_not_inside(out, Path(spec).resolve(), "the spec file")
    with OutputFolder(out, force) as folder:
        spec = as_build_spec(spec)
        passes = tuple(p for p in DEFAULT_PIPELINE if fuse or p not in FUSION)
        g = compile_graph(spec, dtype=dtype, passes=passes, verify_each=True)
        if g.derived and (other := [f for f in formats if f != "hf"]):
            raise BuildError(f"--format {other[0]}: needs a hand-written family module, and {g.config.family} is "
                             f"derived from transformers' {g.state.target.architecture} (it writes hf only)")
        check_not_a_source(out)
        if isinstance(g.state.tokenizer, str):  # its tokenizer files refused before any weight is written
            from compose.sources import open_source

            open_source(g.state.tokenizer).extra_files()
        gguf_plan = _plan_gguf(g) if "gguf" in formats else None  # refuses what llama.cpp cannot compute
        total = _check_size(g, formats, out, limit, gguf_plan)
        if progress:
            print(f"compose: writing {_size(total)} to {out}", file=sys.stderr)
        try:
            _write(g, spec, folder.tmp, formats, shard_bytes, progress, workers, device, dense_moe, allow_nonfinite,
                   passes, memory, gguf_plan)
        except OSError as e:
            raise BuildError(f"{e.filename or out}: cannot write the build ({e.strerror or e})") from None
        folder.commit()
    return out


def _write(g, spec, tmp: Path, formats, shard_bytes, progress, workers, device, dense_moe, allow_nonfinite, passes,
           max_memory, gguf_plan):
    from compose import __version__, model_card
    from compose.backends import hf
    from compose.integrity import hash_files
    from compose.manifest import manifest
    from compose.sources import FolderSource, open_source

    # A model no transformers class holds (CALM, CogVLM, a Gemma MoE) is written as generated code: it is
    # what config.json's auto_map loads. ONNX is exported from the generated module, so it needs the code
    # too. Rendered before any weight is written, so a model the code cannot express is refused first.
    code = None
    if "torch" in formats or "onnx" in formats or hf.target(g).generated:
        from compose.backends import torch as torch_backend

        code = torch_backend.render(g)
    if "onnx" in formats:
        from compose.backends import onnx

        onnx.check_ready(g, dense_moe)
    # The hf checkpoint is what every format loads its weights from, so it is always written.
    written = hf.write(g, tmp, open_source, max_shard_size=shard_bytes, progress=progress, workers=workers,
                       device=device, allow_nonfinite=allow_nonfinite, max_memory=max_memory)
    files = list(written["files"])
    if code is not None:
        files += torch_backend.write_files(code, tmp)
    onnx_record = None
    if "onnx" in formats:
        onnx_record = onnx.export(tmp, dense_moe=dense_moe)
        files += onnx_record["files"]
    if "gguf" in formats:  # read back from the hf checkpoint just written, tensor by tensor
        from compose.backends import gguf

        files += gguf.write(g, tmp, planned=gguf_plan, checkpoint=FolderSource(tmp).tensor)["files"]
    spec_json, tensors, trainable = spec.model_dump(mode="json"), hf.tensors(g), hf.trainable_names(g)
    files.append(model_card.write(tmp, spec_json, g, trainable, tensors, __version__))
    record = manifest(g, version=__version__, spec=spec_json, formats=formats,
                      passes=list(passes), tensors=tensors, trainable=trainable,
                      shards=written["shards"], onnx=onnx_record, files=files,
                      sha256=hash_files(tmp, files, known=written["shards"]))
    (tmp / "compose.json").write_text(json.dumps(record, indent=2) + "\n")


def export_gguf(folder: Path, into: Path | None = None) -> dict:
    """`folder/model.gguf` (or `into/model.gguf`) for an existing build, from its own checkpoint read back as
    a source (the plan refuses what llama.cpp cannot hold before anything is written); what compose.json
    records."""
    from compose.backends import gguf
    from compose.dsl import load
    from compose.sources import FolderSource

    g = compile_graph(load(str(folder)), verify_each=True)
    return gguf.write(g, folder, planned=_plan_gguf(g), checkpoint=FolderSource(folder).tensor, into=into)


def _read_load(e):
    """A Load's tensor, from its opened source (what backends are given to read sources with)."""
    from compose.sources import open_source

    return open_source(e.source).tensor(e.key)


def check_not_a_source(out: Path) -> None:
    """An output that is, lies inside or holds a source would overwrite the model it reads (with --force)."""
    from compose.sources import opened_folders

    for folder in opened_folders():
        if out == folder or folder in out.parents:
            raise BuildError(f"-o {out}: {'is' if out == folder else 'lies inside'} the source folder {folder}; "
                             "choose an output outside every source")
        _check_not_inside(out, folder, "the source folder")


def _check_not_inside(out: Path, path: Path, what: str) -> None:
    """With --force, an output that holds `path` would delete it."""
    if out in path.parents:
        raise BuildError(f"-o {out}: holds {what} {path}; choose an output outside every input")


def _plan_gguf(g):
    """The GGUF file's plan, before the build writes anything (a refusal leaves nothing behind)."""
    from compose.backends import gguf
    from compose.sources import open_source

    return gguf.plan(g, _read_load, open_source)


def _check_size(g, formats, out: Path, limit: int | None, gguf_plan=None) -> int:
    """The bytes the build will write; refused, before the first byte, when more than the free disk or
    --max-output-size."""
    from compose.backends import hf
    from compose.backends.shards import BYTES

    numel = sum(e.numel for e in hf.tensors(g).values())
    total = numel * BYTES[g.config.dtype]
    if "onnx" in formats:  # one graph with its own copy of the weights: float16 for half builds
        total += numel * (2 if g.config.dtype in ("bfloat16", "float16") else 4)
    if gguf_plan is not None:
        total += gguf_plan.nbytes(g.config.dtype)
    free = shutil.disk_usage(out.parent).free
    if limit is not None and total > limit:
        raise BuildError(f"{out}: the build would write {_size(total)}, more than --max-output-size {_size(limit)}")
    if total > free:
        raise BuildError(f"{out}: the build would write {_size(total)}, and {out.parent} has {_size(free)} free")
    return total


def _size(n: int) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def check_device(device: str, flag: str = "--device") -> None:
    if device == "cpu":
        return
    import torch

    try:
        d = torch.device(device)
    except RuntimeError:
        raise BuildError(f"{flag}: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if d.type not in ("cuda", "cpu"):
        raise BuildError(f"{flag}: {device} is not supported (cpu or cuda)")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise BuildError(f"{flag}: {device} asked for, but torch sees no CUDA device")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise BuildError(f"{flag}: {device} asked for, but torch sees {torch.cuda.device_count()} CUDA devices")
