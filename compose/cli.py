"""The `compose` command. Imports stay lazy so `--help` and `--version` answer at once."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  compose build specs/llama_pro.py -o out            LLaMA-Pro expansion of the built-in tiny Llama
  compose build specs/solar.yaml -o out --force      a YAML spec; replace an existing out/
  compose inspect specs/solar.py                     the IR after all passes, and a cost summary
  compose inspect specs/solar.py --after lower       the IR straight after lowering (dropped layers shown)
"""


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
    b.add_argument("--format", default="hf", help="comma-separated: hf, torch (default: hf)")
    b.add_argument("--dtype", choices=DTYPES, help="output dtype (default: the source's)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB (default: 5GB)")
    b.add_argument("--force", action="store_true", help="replace OUT if it exists")
    b.add_argument("--workers", type=int, default=None,
                   help="tensors computed in parallel (default: the CPU count, at most 4); memory stays "
                        "within a budget of about the largest tensor's working set")
    b.add_argument("--device", default="cpu", help="where merges compute: cpu (default) or cuda[:N]")
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
    return p


def _summary(g) -> str:
    c = g.meta.get("cost", {})
    if not c:
        return ""
    pct = 100.0 * c["trainable_params"] / max(c["params"], 1)
    rows = [("layers", f"{c['layers']}"), ("parameters", f"{c['params']:,}"),
            ("trainable", f"{c['trainable_params']:,} ({pct:.1f}%)"),
            ("FLOPs per token", f"{c['flops_per_token']:,}"), (f"bytes ({g.config.dtype})", f"{c['bytes']:,}")]
    return "summary\n" + "\n".join(f"  {k:<18}{v}" for k, v in rows) + "\n"


def cmd_build(a) -> int:
    from compose.pipeline import build

    formats = [f.strip() for f in a.format.split(",") if f.strip()]
    out = build(a.spec, a.out, formats=formats, dtype=a.dtype, max_shard_size=a.max_shard_size, force=a.force,
                progress=not a.no_progress and sys.stderr.isatty(), workers=a.workers, device=a.device)
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help()
        return 2
    from compose.errors import ComposeError

    try:
        return {"build": cmd_build, "inspect": cmd_inspect}[args.command](args)
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
