"""The onnx backend: the generated PyTorch module of a build -> ONNX (torch.onnx, dynamo exporter), checked
in onnxruntime against PyTorch.

Two graphs where it makes sense:
- model.onnx: input_ids (batch, sequence) -> logits, for every kind of composed model (CALM reads the
  same ids with both models; CogVLM also takes token_type_ids and images (batch, patches, width)).
- model_with_past.onnx (one-model builds: dense, merged, MoE): input_ids plus `past_key_values.N.key` /
  `.value` (batch, kv_heads, past_sequence, head_dim), out logits and `present.N.key` / `.value`: the
  Optimum naming, so ONNX Runtime GenAI-style loops can drive it. past_sequence may be 0 (the prompt).
MoE layers export their loop over experts (each expert takes only the rows routed to it: top-k, gather,
index_add stay in the graph and sparse), since grouped_mm has no ONNX translation. `dense_moe` exports the
dense dispatch instead: every expert on every token, weighted by the router (zero where not chosen), a
graph with no data-dependent shapes for runtimes that want one, at n_experts / top_k times the FLOPs.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from compose.backends.onnx_weights import HALF_DTYPES, store_half
from compose.backends.torch import kind, load_module
from compose.errors import BuildError

TOLERANCE = 1e-4
"""Of the outputs' scale: the largest |value| PyTorch computes, at least 1. float32 rounding grows with the
logits' size (a model of width 1024 and 32k vocabulary differs by about 1e-4 in absolute terms)."""
FILES = ("model.onnx", "model_with_past.onnx")


class _WithPast(torch.nn.Module):
    """input_ids + flat (key, value) per layer -> logits + the new (key, value) per layer."""

    def __init__(self, model, module):
        super().__init__()
        self.model, self.module = model, module
        self.train(model.training)  # a new Module starts in training mode, and the exporter warns of it

    def forward(self, input_ids, *past):
        cache = self.module.KVCache()
        for i in range(len(past) // 2):
            cache.keys[i], cache.values[i] = past[2 * i], past[2 * i + 1]
        logits = self.model(input_ids, cache)
        present = [t for i in range(len(past) // 2) for t in (cache.keys[i], cache.values[i])]
        return (logits, *present)


def _inputs(module, model, k: str, batch: int, seq: int, seed: int, past: int | None = None):
    """Example inputs (names -> tensors) of a given shape, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    if k == "cogvlm":
        patches = max(1, seq - 6)
        types = torch.zeros_like(ids)
        types[:, 2:4 + patches] = 1  # begin-of-image, patches, end-of-image
        return {"input_ids": ids, "token_type_ids": types,
                "images": torch.randn(batch, patches, module.VISION_WIDTH, generator=g)}
    out = {"input_ids": ids}
    if past is not None:
        shape = (batch, cfg.n_kv_head, past, cfg.head_dim)
        for i in range(cfg.n_layer):
            out[f"past_key_values.{i}.key"] = torch.randn(shape, generator=g)
            out[f"past_key_values.{i}.value"] = torch.randn(shape, generator=g)
    return out


def _dynamic(names: list[str], k: str) -> tuple:
    from torch.export import Dim

    batch, seq = Dim("batch", max=1024), Dim("sequence", min=8 if k == "cogvlm" else 1, max=1 << 16)
    past = Dim("past_sequence", max=1 << 16)
    shapes = []
    for n in names:
        if n.startswith("past_key_values."):
            shapes.append({0: batch, 2: past})
        elif n == "images":
            shapes.append({0: batch, 1: Dim("patches", max=1 << 14)})
        else:
            shapes.append({0: batch, 1: seq})
    return tuple(shapes)


def _export(model, inputs: dict, outputs: list[str], path: Path, k: str, half: bool = False):
    names = list(inputs)
    shapes = _dynamic(names, k)
    if len(names) > 1 and names[1].startswith("past_key_values."):
        shapes = (shapes[0], tuple(shapes[1:]))  # forward(input_ids, *past)
    with _open_nodes(model) as open_nodes:
        try:
            program = torch.onnx.export(model, tuple(inputs.values()), dynamo=True, input_names=names,
                                        output_names=outputs, dynamic_shapes=shapes, verbose=False,
                                        optimize=False)
            _optimize(program.model)
        except Exception as e:  # noqa: BLE001  (any exporter failure: name the IR node it came from)
            where = f" at node {_ir_node(open_nodes[-1])} ({open_nodes[-1]})" if open_nodes else ""
            raise BuildError(f"ONNX export failed{where}: {_first_line(e)}") from None
    _strip_metadata(program.model)
    program.stored = store_half(program.model) if half else None
    # Past 2 GB of weights the exporter writes them beside the graph as `<name>.data` (a relative name in
    # the graph); a smaller re-export would leave an old one behind, recorded and hashed as if current.
    _data_file(path).unlink(missing_ok=True)
    program.save(str(path))
    return program


def _optimize(model) -> None:
    """The exporter's optimizer without its pattern rewriter: constant folding (weight transposes become
    initializers), dead-node removal, initializer and subexpression dedupe, as torch.onnx's `optimize=True`
    runs them. The rewriter tries every rule at every node: a third of the export of an 8-expert upcycle
    (141 s -> 98 s on 2 cores), whose graphs onnxruntime then runs as fast (it fuses on load itself)."""
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import _constant_folding as folding

    fold = folding.FoldConstantsPass(shape_inference=True,
                                     input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                     output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT)
    ir.passes.Sequential(
        common.InlinePass(),
        ir.passes.PassManager([fold, common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                               common.RemoveUnusedOpsetsPass()], steps=2, early_stop=True),
        common.RemoveUnusedNodesPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.LiftSubgraphInitializersToMainGraphPass(),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _data_file(graph: Path) -> Path:
    return graph.with_name(f"{graph.name}.data")


def _strip_metadata(model) -> None:
    """Drop the exporter's provenance: stack traces with absolute source paths (the build's temporary
    folder, site-packages), class names with the generated module's name, the export signature. None of
    it is the function the graph computes, and with it two identical builds give different bytes."""
    for item in (model, *model.functions.values()):
        _clear(item)
    for graph in (model.graph, *(f.graph for f in model.functions.values())):
        for g in (graph, *graph.subgraphs()):
            _clear(g)
            for value in (*g.inputs, *g.initializers.values()):
                _clear(value)
            for node in g:  # graph outputs are node outputs (or inputs)
                _clear(node)
                for value in node.outputs:
                    _clear(value)


def _clear(item) -> None:
    item.metadata_props.clear()
    item.doc_string = None


def _first_line(e: Exception) -> str:
    """The exporter's own summary of what went wrong (its messages open with generic advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    at = next((i for i, line in enumerate(lines) if line.endswith("Exception summary")), None)
    if at is not None:
        lines = lines[at + 1:]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _ir_node(module_path: str) -> str:
    """Generated module path -> IR node name: model.layers.3 -> layers.3, cross.0 -> xattn.0."""
    if module_path.startswith("cross."):
        return "xattn." + module_path.split(".")[1]
    return module_path.removeprefix("model.model.").removeprefix("model.")


class _open_nodes:
    """While exporting, the stack of node-level modules (layers, cross-attentions, adapters) being traced:
    the exporter runs the Python, so when it fails, the innermost open one is where."""

    def __init__(self, model):
        self.model, self.stack, self.hooks = model, [], []

    def __enter__(self):
        for name, m in self.model.named_modules():
            if re.fullmatch(r"(model\.)?(model\.layers\.\d+|augment\.layers\.\d+|cross\.\d+|vision_adapter)", name):
                self.hooks.append(m.register_forward_pre_hook(lambda _m, _a, n=name: self.stack.append(n)))
                self.hooks.append(m.register_forward_hook(self._close))
        return self.stack

    def _close(self, _module, _args, _output) -> None:  # returning None keeps the module's output
        self.stack.pop()

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        return False


def check_ready(g, dense_moe: bool = False) -> None:
    """Everything that can refuse an ONNX export before a build writes its weights: the exporter's and
    onnxruntime's packages, and --dense-moe on a model with no MoE layers."""
    import importlib.util

    from compose.families.base import moe_blocks

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise BuildError(f"--format onnx needs {', '.join(missing)}: pip install 'compose[onnx]'")
    if dense_moe and not moe_blocks(g):
        raise BuildError("--dense-moe: the model has no MoE layers")


def export(folder: Path, *, check: bool = True, dense_moe: bool = False) -> dict:
    """Export the build in `folder` to ONNX next to its weights; return what compose.json records."""
    folder = Path(folder)
    module = load_module(folder)
    model = module.ComposeForCausalLM.from_pretrained(folder, dtype=torch.float32)
    k = kind(module)
    moe_layers = [m for m in model.modules() if hasattr(m, "dispatch")]
    if dense_moe and not moe_layers:
        raise BuildError(f"--dense-moe: {folder} has no MoE layers")
    for m in moe_layers:
        m.dispatch = "dense" if dense_moe else "loop"
    # A half-precision build keeps its weights half-size in the graphs (see onnx_weights).
    dtype = getattr(module, "DTYPE", None) or module.Config.dtype  # a composite's glue module, or one model's
    half = dtype in HALF_DTYPES
    ex = _inputs(module, model, k, 2, 12, seed=0)
    program = _export(model, ex, ["logits"], folder / FILES[0], k, half)
    graphs = [FILES[0]]
    if k == "single":
        n = model.model.config.n_layer
        ex = _inputs(module, model, k, 2, 3, seed=0, past=5)
        present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        _export(_WithPast(model, module), ex, ["logits", *present], folder / FILES[1], k, half)
        graphs.append(FILES[1])
    files = [f for g in graphs for f in (g, _data_file(folder / g).name) if (folder / f).is_file()]
    opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    record = {"files": files, "opset": opset, "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
              "inputs": {"kind": k}, "compute": "float32",
              "weights": ("float16 (cast to float32 in the graph; float32 where float16 cannot hold a constant: "
                          f"{program.stored['float32']} of {sum(program.stored.values())} in model.onnx)")
              if half else "float32"}
    if moe_layers:
        record["moe_dispatch"] = "dense" if dense_moe else "loop"
    if check:
        record["check"] = verify(folder, module=module, model=model)
    return record


def verify(folder: Path, *, module=None, model=None) -> dict:
    """Run each exported graph in onnxruntime and PyTorch on fresh random inputs of two shapes; raise if
    an output differs by more than 1e-4 or either side computes NaN or Inf. Returns the max abs
    differences."""
    import onnxruntime as ort
    folder = Path(folder)
    module = module or load_module(folder)
    model = model or module.ComposeForCausalLM.from_pretrained(folder, dtype=torch.float32)
    k = kind(module)
    result = {}
    for name in FILES:
        path = folder / name
        if not path.is_file():
            continue
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        worst = limit = 0.0
        for batch, seq, past, seed in ((1, 9, 0, 101), (3, 17, 4, 202)):
            seq, past = (seq, None) if name == FILES[0] else (2, past)
            inputs = _inputs(module, model, k, batch, seq, seed, past=past)
            got = session.run(None, {n: t.numpy() for n, t in inputs.items()})
            with torch.no_grad():
                ref = (_WithPast(model, module) if name == FILES[1] else model)(*inputs.values())
            ref = ref if isinstance(ref, tuple) else (ref,)
            where = f"batch {batch}, sequence {seq}" + ("" if past is None else f", past {past}")
            ref = [r.numpy() for r in ref]
            worst = max(worst, _difference(path, outputs, got, ref, where))
            limit = max(limit, TOLERANCE * max(1.0, *(float(abs(r).max()) for r in ref)))
        if not worst <= limit:
            raise BuildError(f"{path}: onnxruntime differs from PyTorch by {worst:.2e} (> {limit:.2e}: {TOLERANCE:g} "
                             "of the largest output)")
        result[name] = worst
    if not result:
        raise BuildError(f"{folder}: no ONNX graphs to verify (export with `compose export {folder} --format onnx`)")
    return result


def _difference(path: Path, names: list[str], got: list, ref: list, where: str) -> float:
    """The largest abs difference over all outputs. Non-finite values raise here: a NaN compares false
    with everything (max(0.0, nan) is 0.0, nan > tol is False), so no tolerance can judge it."""
    import numpy as np

    if len(got) != len(ref):
        raise BuildError(f"{path}: onnxruntime gives {len(got)} outputs, PyTorch {len(ref)}")
    worst = 0.0
    for name, g, r in zip(names, got, ref):
        bad = [f"{who}'s {name} has {_non_finite(t)}" for who, t in (("onnxruntime", g), ("PyTorch", r))
               if not np.isfinite(t).all()]
        if bad:
            raise BuildError(f"{path}: non-finite output on inputs of {where}: {'; '.join(bad)}")
        if g.shape != r.shape:  # broadcasting would compare the wrong elements
            raise BuildError(f"{path}: {name} has shape {g.shape} in onnxruntime, {r.shape} in PyTorch")
        worst = max(worst, float(np.abs(g.astype(np.float64) - r).max()))
    return worst


def _non_finite(t) -> str:
    import numpy as np

    return f"{int(np.isnan(t).sum())} NaN and {int(np.isinf(t).sum())} Inf of {t.size} values"
