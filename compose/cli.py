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
"""
DENSE_MOE_HELP = ("ONNX: export MoE layers densely (every expert on every token, weighted by the router): no "
                  "data-dependent shapes, n_experts/top_k times the expert FLOPs (default: sparse, a loop over experts)")


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
    b.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder (must not exist without --force)")
    b.add_argument("--format", default="hf", help="comma-separated: hf, torch, onnx (default: hf)")
    b.add_argument("--dtype", choices=DTYPES, help="output dtype (default: the source's)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default: 5GB)")
    b.add_argument("--force", action="store_true", help="replace OUT if it exists")
    b.add_argument("--workers", type=int, default=None,
                   help="tensors computed in parallel (default: the CPU count, at most 4); memory stays "
                        "within a budget of about the largest tensor's working set")
    b.add_argument("--device", default="cpu", help="where merges compute: cpu (default) or cuda[:N]")
    b.add_argument("--dense-moe", action="store_true", help=DENSE_MOE_HELP)
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    i = sub.add_parser("inspect", help="print the IR and a cost summary",
                       description="Print the graph IR of SPEC (where every weight comes from, what is zero-initialised, "
                                   "what is trainable) and a summary of layers, parameters, FLOPs and bytes.")
    i.add_argument("spec", metavar="SPEC")
    i.add_argument("--after", metavar="PASS", help="show the IR after this stage: lower, or a pass name")
    i.add_argument("--print-after-all", action="store_true", help="print the IR after lowering and after every pass")
    i.add_argument("--dot", metavar="FILE", help="also write the graph as Graphviz DOT to FILE")
    i.add_argument("--dtype", choices=DTYPES, help="dtype for the byte count")
    i.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    e = sub.add_parser("export", help="export an existing build (to ONNX)",
                       description="Export the build in OUT to ONNX next to its weights (model.onnx, and "
                                   "model_with_past.onnx with past_key_values.N.key/value inputs for one-model "
                                   "builds), checked in onnxruntime; recorded in compose.json.")
    e.add_argument("out", metavar="OUT")
    e.add_argument("--format", default="onnx", choices=["onnx"])
    e.add_argument("--dense-moe", action="store_true", help=DENSE_MOE_HELP)
    e.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    v = sub.add_parser("verify", help="check a build's ONNX graphs against PyTorch",
                       description="Run OUT's ONNX graphs in onnxruntime and the generated PyTorch module on fresh "
                                   "random inputs of two shapes; fail if a logit differs by more than 1e-4.")
    v.add_argument("out", metavar="OUT")
    v.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)

    g = sub.add_parser("generate", help="generate text with a build",
                       description="Generate from OUT with the generated module and a static KV cache (decode steps "
                                   "replayed as CUDA graphs on CUDA). Greedy unless --temperature > 0.")
    g.add_argument("out", metavar="OUT")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
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


def cmd_build(a) -> int:
    from compose.pipeline import build

    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    out = build(a.spec, a.out, formats=formats, dtype=a.dtype, max_shard_size=a.max_shard_size, force=a.force,
                progress=not a.no_progress and sys.stderr.isatty(), workers=a.workers, device=a.device,
                dense_moe=a.dense_moe)
    print(f"built {out}")
    return 0


def cmd_inspect(a) -> int:
    from compose.errors import SpecError
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
    print(_summary(g), end="")
    if a.dot:
        with open(a.dot, "w") as f:
            f.write(to_dot(chosen))
    return 0


def _built(out: str):
    from pathlib import Path

    from compose.errors import BuildError

    folder = Path(out)
    if not (folder / "compose.json").is_file():
        raise BuildError(f"{folder}: not a compose build (no compose.json)")
    return folder


def cmd_export(a) -> int:
    import json
    import os

    from compose.backends import onnx

    folder = _built(a.out)
    record = onnx.export(folder, dense_moe=a.dense_moe)
    manifest = json.loads((folder / "compose.json").read_text())
    manifest["onnx"] = record
    tmp = folder / "compose.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / "compose.json")
    print(f"exported {', '.join(record['files'])} (opset {record['opset']}); "
          f"max |onnxruntime - torch| = {max(record['check'].values()):.1e}")
    return 0


def cmd_verify(a) -> int:
    from compose.backends import onnx

    result = onnx.verify(_built(a.out))
    for name, diff in result.items():
        print(f"{name}: max |onnxruntime - torch| = {diff:.1e} (<= 1e-4)")
    return 0


def cmd_generate(a) -> int:
    import torch

    from compose.backends import runtime
    from compose.lower.text import text_tokenizer

    folder = _built(a.out)
    module, model = runtime.load(folder, a.device, a.dtype)
    encode, decode = text_tokenizer(folder, model.model.config.vocab_size)
    ids = encode(a.prompt)[None].to(a.device)
    out = runtime.generate(module, model, ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                           top_p=a.top_p, seed=a.seed, cuda_graph=False if a.no_cuda_graph else None)
    print(decode(out[0].tolist()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help()
        return 2
    from compose.errors import ComposeError

    try:
        commands = {"build": cmd_build, "inspect": cmd_inspect, "export": cmd_export, "verify": cmd_verify,
                    "generate": cmd_generate}
        return commands[args.command](args)
    except ComposeError as e:
        if args.debug:
            raise
        print(f"compose: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compose: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
