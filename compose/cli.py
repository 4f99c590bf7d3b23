"""The `compose` command. Imports stay lazy so `--help` and `--version` answer at once."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  compose build specs/llama_pro.py -o out            LLaMA-Pro expansion of the built-in tiny Llama
  compose build specs/solar.yaml -o out --force      a YAML spec; replace an existing out/
  compose inspect specs/solar.py                     the IR after all passes, and a cost summary
  compose inspect specs/solar.py --after lower       the IR straight after lowering (dropped layers shown)
  compose build specs/moe_upcycle.py -o out --format hf,onnx   also export to ONNX, checked in onnxruntime
  compose export out --format onnx                   export an existing build
  compose verify out                                 re-run the onnxruntime-vs-PyTorch check
  compose generate out --prompt "Once upon" --max-new-tokens 20
  compose extract-lora --model ft --base base -o adapter --rank 16   a LoRA of ft - base (PEFT's format)
"""
DENSE_MOE_HELP = ("ONNX: export MoE layers densely (every expert on every token, weighted by the router): no "
                  "data-dependent shapes, n_experts/top_k times the expert FLOPs (default: sparse, a loop over "
                  "experts)")

OUT_HELP = ("output folder, which must not exist without --force; never the current directory or one holding it, "
            "/, the home directory, a symlink, a file, a device, a FIFO or a socket")
FORCE_HELP = ("replace OUT if it is an empty folder or one compose wrote (holding {marker}); any other folder, "
              "and a symlink's target, are never replaced")


def _parser() -> argparse.ArgumentParser:
    from compose import __version__
    from compose.spec import DTYPES

    p = argparse.ArgumentParser(
        prog="compose", description="A compiler for composing language models: spec -> graph IR -> checkpoint.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"compose {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    b = sub.add_parser("build", help="build a spec into a model folder",
                       description="Build SPEC (.py with a module-level `model`, or .yaml/.json) into OUT: "
                                   "config.json + safetensors for transformers, compose.json (provenance, "
                                   "trainable names, hashes), and with --format torch a generated modeling_compose.py.")
    b.add_argument("spec", metavar="SPEC")
    b.add_argument("-o", "--out", required=True, metavar="OUT", help=OUT_HELP)
    b.add_argument("--format", default="hf", help="comma-separated: hf, torch, onnx, gguf (llama.cpp's model.gguf, "
                        "from the hf checkpoint) (default: hf)")
    b.add_argument("--dtype", choices=DTYPES, help="output dtype (default: the source's)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default: 5GB)")
    b.add_argument("--force", action="store_true", help=FORCE_HELP.format(marker="compose.json"))
    b.add_argument("--workers", type=int, default=None,
                   help="tensors computed in parallel (default: the CPU count, at most 4); memory stays "
                        "within a budget of about the largest tensor's working set")
    b.add_argument("--device", default="cpu", help="where merges compute: cpu (default) or cuda[:N]")
    b.add_argument("--dense-moe", action="store_true", help=DENSE_MOE_HELP)
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--max-output-size", metavar="SIZE",
                   help="refuse, before writing, a build larger than this, e.g. 20GB (always refused: more "
                        "than the free disk space)")
    b.add_argument("--allow-nonfinite", action="store_true",
                   help="build even if source weights hold NaN or Inf (a warning names them); merges that "
                        "make NaN or Inf from finite inputs are always errors")
    b.add_argument("--max-memory", metavar="SIZE",
                   help="bound the memory of the tensors being computed, e.g. 4GB (default: about 1.25x the "
                        "largest tensor's working set); a tensor that alone needs more is refused before writing")
    b.add_argument("--no-fuse", action="store_true",
                   help="generated code (--format torch, onnx) computes q/k/v and gate/up as separate matmuls, "
                        "as the checkpoint names them (default: fused; the checkpoint is the same either way)")
    b.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    i = sub.add_parser("inspect", help="print the IR and a cost summary",
                       description="Print the graph IR of SPEC (where every weight comes from, what is "
                                   "zero-initialised, what is trainable) and a summary of layers, parameters, FLOPs "
                                   "and bytes.")
    i.add_argument("spec", metavar="SPEC")
    i.add_argument("--after", metavar="PASS", help="show the IR after this stage: lower, or a pass name")
    i.add_argument("--print-after-all", action="store_true", help="print the IR after lowering and after every pass")
    i.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz DOT to FILE")
    i.add_argument("--dtype", choices=DTYPES, help="dtype for the byte count")
    i.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    e = sub.add_parser("export", help="export an existing build (to ONNX or GGUF)",
                       description="Export the build in OUT next to its weights, recorded in compose.json. onnx: "
                                   "model.onnx (for one-model builds the decoder as Optimum's ORTModelForCausalLM "
                                   "loads it: input_ids, attention_mask, position_ids, past_key_values.N.key/value; "
                                   "plus genai_config.json for onnxruntime-genai), checked in onnxruntime. gguf: "
                                   "model.gguf for llama.cpp, from the build's own checkpoint (its sha256 checked "
                                   "first).")
    e.add_argument("out", metavar="OUT")
    e.add_argument("--format", default="onnx", choices=["onnx", "gguf"])
    e.add_argument("--dense-moe", action="store_true", help=DENSE_MOE_HELP)
    e.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    v = sub.add_parser("verify", help="check a build's files and its ONNX graphs",
                       description="Check every file of OUT against the sha256 compose.json records (before "
                                   "anything is imported), then run OUT's ONNX graphs in onnxruntime and the "
                                   "generated PyTorch module on fresh random inputs of two shapes; fail if a "
                                   "logit differs by more than 1e-4 or is not finite.")
    v.add_argument("out", metavar="OUT")
    v.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    x = sub.add_parser("extract-lora", help="write a LoRA adapter of a fine-tune's difference from its base",
                       description="Write a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors) of "
                                   "rank RANK from MODEL - BASE, as mergekit-extract-lora does: each linear "
                                   "layer's difference cut to rank RANK by SVD, embeddings, head and norms saved "
                                   "whole (modules_to_save), changed biases of the adapted layers as PEFT saves "
                                   "trained ones (bias: lora_only); the options are mergekit-extract-lora's. Load "
                                   "it with PEFT, or fold it back with load(\"BASE+OUT\").")
    x.add_argument("--model", required=True, help="the fine-tuned model (folder, hub id or tiny:...)")
    x.add_argument("--base", required=True, help="the base model it was fine-tuned from")
    x.add_argument("-o", "--out", required=True, metavar="OUT", help=OUT_HELP)
    x.add_argument("--rank", type=int, required=True, help="LoRA rank r (a module narrower than r keeps its full rank)")
    x.add_argument("--sv-epsilon", type=float, default=0.0, metavar="EPS",
                   help="also drop singular values <= EPS (default 0: keep RANK); the ranks then depend on the "
                        "values, so the factors are computed before writing and held in memory")
    x.add_argument("--no-distribute-scale", dest="distribute_scale", action="store_false",
                   help="put the singular values in A (A = S Vh, B = U) instead of sqrt(S) in each")
    x.add_argument("--embed-lora", action="store_true",
                   help="decompose the embeddings and head too, instead of saving them whole")
    x.add_argument("--save-module", action="append", default=[], metavar="NAME",
                   help="save the modules named NAME (a last name such as o_proj, or a full name) whole; repeatable")
    x.add_argument("-i", "--include-regex", action="append", default=[], metavar="RE",
                   help="consider only the modules whose name RE matches (re.search); repeatable")
    x.add_argument("-e", "--exclude-regex", action="append", default=[], metavar="RE",
                   help="leave out the modules whose name RE matches; repeatable")
    x.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out the tensors of modules that are not linear (the norms) instead of saving them whole")
    x.add_argument("--device", default="cpu", help="where the SVDs run: cpu (default) or cuda[:N]")
    x.add_argument("--force", action="store_true", help=FORCE_HELP.format(marker="adapter_config.json"))
    x.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    g = sub.add_parser("generate", help="generate text with a build",
                       description="Generate from OUT with the generated module and a static KV cache (decode steps "
                                   "replayed as CUDA graphs on CUDA). Greedy unless --temperature > 0.")
    g.add_argument("out", metavar="OUT")
    g.add_argument("--prompt", required=True, action="append",
                   help="the text to continue; repeat it for a batch (left-padded, each prompt continued as it "
                        "would be alone)")
    g.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate, 1 to 65536 (default: 32)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy; > 0 samples")
    g.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (k >= 1)")
    g.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens whose "
                                                                   "probability reaches p, 0 < p <= 1")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cpu")
    g.add_argument("--dtype", choices=DTYPES, help="compute dtype (default: the checkpoint's)")
    g.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    g.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    return p


def _summary(g) -> str:
    c = g.state.cost
    if c is None:
        return ""
    pct = 100.0 * c.trainable_params / max(c.params, 1)
    rows = [("layers", f"{c.layers}"), ("parameters", f"{c.params:,}"),
            ("trainable", f"{c.trainable_params:,} ({pct:.1f}%)"),
            ("FLOPs per token", f"{c.flops_per_token:,}"), (f"bytes ({g.config.dtype})", f"{c.bytes:,}")]
    return "summary\n" + "\n".join(f"  {k:<18}{v}" for k, v in rows) + "\n"


def _families(g) -> str:
    """Which family read each source, and what a derived family found (compose.families.describe)."""
    from compose import families
    from compose.sources import opened

    return "".join(line + "\n" for line in families.describe([(s.ref, s.config) for s in opened()], g))


def cmd_build(a) -> int:
    from compose.pipeline import build

    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    out = build(a.spec, a.out, formats=formats, dtype=a.dtype, max_shard_size=a.max_shard_size, force=a.force,
                progress=not a.no_progress and sys.stderr.isatty(), workers=a.workers, device=a.device,
                dense_moe=a.dense_moe, max_output_size=a.max_output_size, allow_nonfinite=a.allow_nonfinite,
                fuse=not a.no_fuse, max_memory=a.max_memory)
    print(f"built {out}")
    return 0


def cmd_inspect(a) -> int:
    from compose.errors import BuildError, SpecError
    from compose.ir import print_graph
    from compose.ir.dot import to_dot
    from compose.passes import REGISTRY
    from compose.pipeline import compile_graph

    stages = ["lower", *REGISTRY]
    if a.after and a.after not in stages:
        raise SpecError(f"--after: unknown stage {a.after!r} (stages: {', '.join(stages)})")
    shown = {}

    def after(name, g):
        if a.print_after_all:
            print(f"// ---- after {name} ----")
            print(print_graph(g))
        if name == a.after:
            shown["g"] = g

    g = compile_graph(a.spec, dtype=a.dtype, verify_each=True, after=after)
    chosen = shown.get("g", g)
    if not a.print_after_all:
        print(print_graph(chosen), end="")
    print(_families(g), end="")
    print(_summary(g), end="")
    if a.dot:
        try:
            with open(a.dot, "w") as f:
                f.write(to_dot(chosen))
        except OSError as e:
            raise BuildError(f"--dot {a.dot}: cannot write ({e.strerror})") from None
    return 0


def _built(folder, *, weights: bool = False):
    """A build folder whose recorded files are unchanged: code and configs always (they decide what is
    imported and run), the weights too with `weights`. Call it under the folder's lock."""
    from compose.integrity import check

    check(folder, weights=weights)
    return folder


def cmd_export(a) -> int:
    from compose.output import FolderLock

    if a.format == "gguf" and a.dense_moe:
        from compose.errors import BuildError

        raise BuildError("--dense-moe: applies to --format onnx")
    # Exclusive: no build replaces the folder, and no other export writes into it, while this one runs.
    with FolderLock(a.out, exclusive=True) as folder:
        return (_export_gguf if a.format == "gguf" else _export_onnx)(a, folder)


def _export_onnx(a, folder) -> int:
    from compose.backends import onnx
    from compose.integrity import forget_files, manifest_of, record_files
    from compose.output import Staging

    _built(folder)
    with Staging(folder) as staged:  # checked in onnxruntime there; the folder's own files stay until then
        record = onnx.export(folder, dense_moe=a.dense_moe, into=staged.path)
        previous = manifest_of(folder)
        old = previous.get("onnx")
        old = old.get("files") if isinstance(old, dict) else None
        # Only names an ONNX export writes: a compose.json edited to list the weights must not delete them.
        stale = [f for f in old if isinstance(f, str) and f in onnx.own_files() and f not in record["files"]] \
            if isinstance(old, list) else []
        staged.publish(record["files"])
    _save_manifest(folder, record_files(folder, {**forget_files(folder, previous, stale), "onnx": record},
                                        record["files"]))
    print(f"exported {', '.join(record['files'])} (opset {record['opset']}); "
          f"max |onnxruntime - torch| = {max(record['check'].values()):.1e}")
    return 0


def _export_gguf(a, folder) -> int:
    import os

    from compose.backends.gguf import FILE
    from compose.integrity import manifest_of, record_files
    from compose.output import Staging
    from compose.pipeline import export_gguf

    _built(folder, weights=True)  # GGUF copies the weights: they must be the ones recorded
    if os.path.lexists(folder / FILE):  # a link too: never written through, never replaced unasked
        from compose.errors import BuildError

        raise BuildError(f"{folder / FILE}: already exported (remove it to export again)")
    with Staging(folder) as staged:
        files = export_gguf(folder, into=staged.path)["files"]
        staged.publish(files)
    _save_manifest(folder, record_files(folder, manifest_of(folder), files))
    print(f"exported {', '.join(files)}")
    return 0


def _save_manifest(folder, manifest: dict) -> None:
    """compose.json replaced in one rename: a reader sees the old record or the new one, never half."""
    import json

    from compose.output import replace_file

    replace_file(folder, "compose.json", (json.dumps(manifest, indent=2) + "\n").encode())


def cmd_verify(a) -> int:
    from compose.backends import onnx
    from compose.output import FolderLock

    with FolderLock(a.out, exclusive=False) as folder:
        _built(folder, weights=True)
        print(f"{folder}: every file matches compose.json's sha256")
        result = onnx.verify(folder)
    for name, diff in result.items():
        print(f"{name}: max |onnxruntime - torch| = {diff:.1e} (<= 1e-4)")
    return 0


MAX_NEW_TOKENS = 65536
MAX_SEED = 2 ** 63 - 1
"""torch.Generator.manual_seed's range."""
MAX_PROMPT_BYTES = 4 << 20


def _check_generate_flags(a) -> None:
    import math

    from compose.errors import BuildError

    if not 1 <= a.max_new_tokens <= MAX_NEW_TOKENS:
        raise BuildError(f"--max-new-tokens: must be 1 to {MAX_NEW_TOKENS}, got {a.max_new_tokens}")
    if not (math.isfinite(a.temperature) and a.temperature >= 0):
        raise BuildError(f"--temperature: must be a finite number >= 0, got {a.temperature}")
    if a.top_k is not None and a.top_k < 1:
        raise BuildError(f"--top-k: must be at least 1, got {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:  # also false for nan
        raise BuildError(f"--top-p: must lie in (0, 1], got {a.top_p}")
    if a.temperature == 0 and (a.top_k is not None or a.top_p is not None):
        raise BuildError("--top-k/--top-p: apply to sampling; add --temperature > 0")
    if not 0 <= a.seed <= MAX_SEED:
        raise BuildError(f"--seed: must be 0 to 2**63 - 1, got {a.seed}")
    for i, prompt in enumerate(a.prompt):
        try:  # argv that is not UTF-8 arrives as lone surrogates, which no tokenizer can encode
            size = len(prompt.encode("utf-8"))
        except UnicodeEncodeError:
            raise BuildError(f"--prompt {i + 1}: not valid UTF-8 text") from None
        if size > MAX_PROMPT_BYTES:  # before tokenizing: no context is that long
            raise BuildError(f"--prompt {i + 1}: {size} bytes, more than {MAX_PROMPT_BYTES} (no model's context "
                             "holds that)")


def cmd_generate(a) -> int:
    from compose.backends import runtime
    from compose.lower.text import text_tokenizer
    from compose.output import FolderLock
    from compose.pipeline import check_device

    _check_generate_flags(a)
    check_device(a.device, "--device")
    with FolderLock(a.out, exclusive=False) as folder:  # shared: no build replaces it while it is read
        module, model = runtime.load(_built(folder), a.device, a.dtype)
        encode, decode = text_tokenizer(folder, model.model.config.vocab_size)
    rows = [encode(p) for p in a.prompt]
    width = max(len(r) for r in rows)
    limit = getattr(model.model.config, "max_positions", None)
    if limit and width + a.max_new_tokens > limit:  # the static cache would be sized past what rope was made for
        from compose.errors import BuildError

        if width > limit:
            raise BuildError(f"--prompt: {width} tokens, longer than the model's context of {limit} positions")
        raise BuildError(f"--max-new-tokens: the prompt's {width} tokens plus {a.max_new_tokens} new ones exceed the "
                         f"model's context of {limit} positions (at most {limit - width} new tokens fit)")
    if len(rows) == 1:
        ids, mask, pads = rows[0][None], None, [0]
    else:  # left-padded: the pad id is never attended to, so any id does
        import torch

        pads = [width - len(r) for r in rows]
        ids = torch.stack([torch.cat((r.new_zeros(n), r)) for r, n in zip(rows, pads)])
        mask = (torch.arange(width)[None] >= torch.tensor(pads)[:, None]).long().to(a.device)
    out = runtime.generate(module, model, ids.to(a.device), a.max_new_tokens, temperature=a.temperature,
                           top_k=a.top_k, top_p=a.top_p, seed=a.seed, attention_mask=mask,
                           cuda_graph=False if a.no_cuda_graph else None)
    for row, n in zip(out.tolist(), pads):
        print(decode(row[n:]))
    return 0


def cmd_extract_lora(a) -> int:
    from compose.extract_lora import Options, extract

    o = Options(a.rank, sv_epsilon=a.sv_epsilon, distribute_scale=a.distribute_scale, embed_lora=a.embed_lora,
                save_modules=tuple(a.save_module), include=tuple(a.include_regex), exclude=tuple(a.exclude_regex),
                skip_undecomposable=a.skip_undecomposable)
    out = extract(a.model, a.base, a.out, o, force=a.force, device=a.device, progress=sys.stderr.isatty())
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help()
        return 2
    from compose.errors import ComposeError

    try:
        commands = {"build": cmd_build, "inspect": cmd_inspect, "export": cmd_export, "verify": cmd_verify,
                    "generate": cmd_generate, "extract-lora": cmd_extract_lora}
        return commands[args.command](args)
    except ComposeError as e:
        if args.debug:
            raise
        print(f"compose: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"compose: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    except OSError as e:  # the machine said no (disk full, read-only, a path too long): the user's to fix
        if args.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"compose: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        print(f"compose: internal error (a bug in compose; rerun with --debug for the traceback): "
              f"{type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 70


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


if __name__ == "__main__":
    sys.exit(main())
