"""The onnx backend: the generated PyTorch module of a build -> ONNX (torch.onnx, dynamo exporter), checked
in onnxruntime against PyTorch.

One graph, `model.onnx`:
- one-model builds (dense, merged, MoE): the decoder as Optimum exports it, so that
  `optimum.onnxruntime.ORTModelForCausalLM.from_pretrained(folder)` (which loads `model.onnx` unless told
  otherwise) and onnxruntime-genai (through the `genai_config.json` written beside it) drive it as they
  are. Inputs `input_ids`, `attention_mask` (batch, past_sequence_length + sequence_length),
  `position_ids`, `past_key_values.N.key` / `.value` (batch, kv_heads, past_sequence_length, head_dim);
  outputs `logits` and `present.N.key` / `.value`. The prompt is the step with an empty past
  (past_sequence_length 0), so no second graph without a cache is needed (Optimum's own exports have
  none either, and each graph holds a full copy of the weights). Padding is masked out of attention and
  positions come from position_ids, so a left-padded batch decodes what transformers decodes.
- CALM and CogVLM: input_ids (batch, sequence) -> logits, no cache (CALM reads the same ids with both
  models; CogVLM also takes token_type_ids and images (batch, patches, width)).
MoE layers export their loop over experts (each expert takes only the rows routed to it: top-k, gather,
index_add stay in the graph and sparse), since grouped_mm has no ONNX translation. `dense_moe` exports the
dense dispatch instead: every expert on every token, weighted by the router (zero where not chosen), a
graph with no data-dependent shapes for runtimes that want one, at n_experts / top_k times the FLOPs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from compose.backends.onnx_weights import HALF_DTYPES, store_half
from compose.backends.torch import kind, load_module
from compose.errors import BuildError, install_hint

TOLERANCE = 1e-4
"""Of the outputs' scale: the largest |value| PyTorch computes, at least 1. float32 rounding grows with the
logits' size (a model of width 1024 and 32k vocabulary differs by about 1e-4 in absolute terms)."""
GRAPH = "model.onnx"
"""Optimum's ONNX_WEIGHTS_NAME: what ORTModelForCausalLM.from_pretrained loads without a file_name."""
GENAI_CONFIG = "genai_config.json"
FILES = (GRAPH,)
LEGACY_GRAPHS = ("model_with_past.onnx",)
"""Graphs an earlier compose exported; a new export removes them when compose.json records them."""


def own_files() -> frozenset[str]:
    """Every file name an ONNX export writes, or an earlier one wrote: the only names an export may delete
    because compose.json lists them (a hand-edited list naming the weights must not delete the weights)."""
    graphs = (*FILES, *LEGACY_GRAPHS)
    return frozenset((*graphs, *(_data_file(Path(g)).name for g in graphs), GENAI_CONFIG))
PAST = ("past_key_values.{}.key", "past_key_values.{}.value")
PRESENT = ("present.{}.key", "present.{}.value")
DIMS = {"batch": "batch_size", "sequence": "sequence_length", "past": "past_sequence_length",
        "total": "past_sequence_length + sequence_length"}
"""Optimum's names of the dynamic axes (its OnnxConfig.inputs / add_past_key_values)."""


class _Decoder(torch.nn.Module):
    """The generated model with Optimum's decoder signature: (input_ids, attention_mask, position_ids, then
    each layer's past key and value) -> (logits, then each layer's present key and value).

    The generated forward does the masking (see its `hide_padding`): rope at position_ids; query t, at
    cache index past + t, sees key j where j <= past + t, attention_mask keeps j, and (in a sliding layer)
    past + t - j < window, as transformers' masks on cache indices; and every query sees itself, so a
    padding row never softmaxes over nothing (NaN, which would reach real rows through the next layer).
    """

    def __init__(self, model, module):
        super().__init__()
        self.model, self.module = model, module
        self.train(model.training)  # a new Module starts in training mode, and the exporter warns of it

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = self.module.KVCache()
        for i in range(len(past) // 2):
            cache.keys[i], cache.values[i] = past[2 * i], past[2 * i + 1]
        logits = self.model(input_ids, cache, attention_mask, position_ids)
        present = [t for i in range(len(past) // 2) for t in (cache.keys[i], cache.values[i])]
        return (logits, *present)


def _inputs(module, model, k: str, batch: int, seq: int, seed: int, past: int | None = None,
            pad: tuple[int, ...] = ()):
    """Example inputs (names -> tensors) of a given shape, drawn from `seed`. With `past` (the decoder of a
    one-model build): that many cached positions, and rows left-padded by `pad` tokens each."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    if k == "cogvlm":
        patches = max(1, seq - 6)
        types = torch.zeros_like(ids)
        types[:, 2:4 + patches] = 1  # begin-of-image, patches, end-of-image
        return {"input_ids": ids, "token_type_ids": types,
                "images": torch.randn(batch, patches, module.VISION_WIDTH, generator=g)}
    if past is None:
        return {"input_ids": ids}
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)[:, past:]}
    shape = (batch, cfg.n_kv_head, past, cfg.head_dim)
    for i in range(cfg.n_layer):
        for name in PAST:
            out[name.format(i)] = torch.randn(shape, generator=g)
    return out


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, S) position of each token: how many real tokens come before it (padding gets 1), as
    transformers' and Optimum's generate compute position_ids from the attention mask."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def prompt_inputs(session, input_ids) -> dict:
    """The feed of `session` (a model.onnx) for a prompt of unpadded rows, as numpy: `input_ids` alone for
    CALM and CogVLM's graphs; for a decoder, also a mask of ones, positions 0.. and an empty past."""
    import numpy as np

    ids = np.asarray(input_ids)
    B, T = ids.shape
    kv = {o.name: o.shape for o in session.get_outputs()}
    feed = {}
    for i in session.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = ids
        elif i.name == "attention_mask":
            feed[i.name] = np.ones((B, T), dtype=np.int64)
        elif i.name == "position_ids":
            feed[i.name] = np.broadcast_to(np.arange(T, dtype=np.int64), (B, T)).copy()
        elif i.name.startswith("past_key_values."):
            shape = kv[i.name.replace("past_key_values.", "present.")]
            feed[i.name] = np.zeros((B, shape[1], 0, shape[3]), dtype=np.float32)
    return feed


def _dynamic(names: list[str], k: str) -> tuple:
    from torch.export import Dim

    batch = Dim(DIMS["batch"], max=1024)
    seq = Dim(DIMS["sequence"], min=8 if k == "cogvlm" else 1, max=1 << 16)
    past = Dim(DIMS["past"], max=1 << 16)
    shapes = []
    for n in names:
        if n.startswith("past_key_values."):
            shapes.append({0: batch, 2: past})
        elif n == "attention_mask":  # past + sequence: a sum of two dims, which Dim cannot declare
            shapes.append({0: batch, 1: Dim.AUTO})
        elif n == "images":
            shapes.append({0: batch, 1: Dim("patches", max=1 << 14)})
        else:
            shapes.append({0: batch, 1: seq})
    return tuple(shapes)


def _export(model, inputs: dict, outputs: list[str], path: Path, k: str, half: bool = False):
    names = list(inputs)
    shapes = _dynamic(names, k)
    decoder = names[1:2] == ["attention_mask"]
    if decoder:
        shapes = (*shapes[:3], tuple(shapes[3:]))  # forward(input_ids, attention_mask, position_ids, *past)
    with _open_nodes(model) as open_nodes:
        try:
            program = torch.onnx.export(model, tuple(inputs.values()), dynamo=True, input_names=names,
                                        output_names=outputs, dynamic_shapes=shapes, verbose=False,
                                        optimize=False)
            _optimize(program.model)
        except Exception as e:  # noqa: BLE001  (any exporter failure: name the IR node it came from)
            where = f" at node {_ir_node(open_nodes[-1])} ({open_nodes[-1]})" if open_nodes else ""
            raise BuildError(f"ONNX export failed{where}: {_first_line(e)}") from None
    if decoder:
        _optimum_layout(program.model)
    _strip_metadata(program.model)
    program.stored = store_half(program.model) if half else None
    # Past 2 GB of weights the exporter writes them beside the graph as `<name>.data` (a relative name in
    # the graph); a smaller re-export would leave an old one behind, recorded and hashed as if current.
    _data_file(path).unlink(missing_ok=True)
    program.save(str(path))
    return program


def _optimum_layout(model) -> None:
    """The decoder's interface as Optimum's exports have it, and an empty past of any width accepted.

    - Axis names: the exporter names the mask's length after a symbol of its own (the sum of two dims);
      it becomes `past_sequence_length + sequence_length`, on the mask and on every present.
    - Each past input is reshaped to (batch, kv_heads, past, head_dim) inside the graph, and its heads and
      width axes are left open. Optimum's first step feeds zeros of (batch, H, 0, D) with H and D from its
      own table of model types, which falls back to num_attention_heads and hidden_size / heads (Mixtral
      is not in it: with grouped-query attention, H is not the kv heads). An empty tensor reshapes to any
      empty shape, so that step runs; a non-empty past of the wrong size still fails, in the Reshape.
    """
    import onnx_ir as ir

    graph = model.graph
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    total = mask.shape[1]
    rename = {str(total): DIMS["total"]} if isinstance(total, ir.SymbolicDim) else {}
    for value in (*graph.inputs, *graph.outputs, *(o for n in graph for o in n.outputs)):
        if value.shape is not None and any(str(d) in rename for d in value.shape):
            value.shape = ir.Shape([ir.SymbolicDim(rename[str(d)]) if str(d) in rename else d for d in value.shape])
    first = graph[0]
    for value in [v for v in graph.inputs if v.name.startswith("past_key_values.")]:
        batch, heads, past, width = value.shape
        name = value.name
        fixed = ir.Value(name=f"{name}.reshaped", shape=value.shape, type=value.type)
        ir.convenience.replace_all_uses_with(value, fixed)
        ends = [ir.Node("", "Shape", [value], [ir.AttrInt64("start", d), ir.AttrInt64("end", d + 1)],
                        name=f"{name}.dim{d}") for d in (0, 2)]
        consts = [ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor([n], dtype=ir.DataType.INT64))],
                          name=f"{name}.{what}") for what, n in (("heads", heads), ("width", width))]
        target = ir.Node("", "Concat", [ends[0].outputs[0], consts[0].outputs[0], ends[1].outputs[0],
                                        consts[1].outputs[0]], [ir.AttrInt64("axis", 0)], name=f"{name}.shape")
        reshape = ir.Node("", "Reshape", [value, target.outputs[0]], [ir.AttrInt64("allowzero", 1)],
                          outputs=[fixed], name=f"{name}.reshape")
        graph.insert_before(first, [*ends, *consts, target, reshape])
        value.shape = ir.Shape([batch, ir.SymbolicDim("past_key_value_heads"), past,
                                ir.SymbolicDim("past_head_size")])


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
        raise BuildError(f"--format onnx needs {', '.join(missing)}: {install_hint('onnx')}")
    if dense_moe and not moe_blocks(g):
        raise BuildError("--dense-moe: the model has no MoE layers")


def export(folder: Path, *, check: bool = True, dense_moe: bool = False, into: Path | None = None) -> dict:
    """Export the build in `folder` to ONNX next to its weights (or into the folder `into`, from where the
    caller moves the files beside them once every check passed); return what compose.json records."""
    folder = Path(folder)
    into = Path(into) if into is not None else folder
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
    if k == "single":
        n = model.model.config.n_layer
        ex = _inputs(module, model, k, 2, 3, seed=0, past=5)
        present = [name.format(i) for i in range(n) for name in PRESENT]
        program = _export(_Decoder(model, module), ex, ["logits", *present], into / GRAPH, k, half)
        (into / GENAI_CONFIG).write_text(json.dumps(genai_config(folder, model.model.config), indent=2) + "\n")
    else:
        program = _export(model, _inputs(module, model, k, 2, 12, seed=0), ["logits"], into / GRAPH, k, half)
    files = [f for f in (GRAPH, _data_file(into / GRAPH).name, GENAI_CONFIG) if (into / f).is_file()]
    opset = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    record = {"files": files, "opset": opset, "exporter": f"torch.onnx dynamo (torch {torch.__version__})",
              "inputs": {"kind": k}, "compute": "float32",
              "weights": ("float16 (cast to float32 in the graph; float32 where float16 cannot hold a constant: "
                          f"{program.stored['float32']} of {sum(program.stored.values())} in {GRAPH})")
              if half else "float32"}
    if k == "single":
        record["inputs"]["layout"] = "optimum decoder with past (empty past for the prompt)"
    if moe_layers:
        record["moe_dispatch"] = "dense" if dense_moe else "loop"
    if check:
        record["check"] = verify(folder, module=module, model=model, graphs=into)
    return record


def genai_config(folder: Path, cfg) -> dict:
    """onnxruntime-genai's genai_config.json for model.onnx: its generic decoder ("decoder"), with the
    graph's input and output names, the attention sizes, and search defaults. Special token ids come from
    generation_config.json where the build has one, else from config.json; genai pads with pad_token_id
    (eos where none is set, as its model builder does)."""
    ids = {}
    for name in ("config.json", "generation_config.json"):  # the second, where present, wins
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            ids.update({key: data[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample",
                                                   "temperature", "top_k", "top_p", "repetition_penalty")
                        if data.get(key) is not None})
    eos = ids.get("eos_token_id")
    pad = ids.get("pad_token_id", eos[0] if isinstance(eos, list) else eos)
    return {
        "model": {
            "bos_token_id": ids.get("bos_token_id"),
            "context_length": cfg.max_positions,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": GRAPH,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.n_embd,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids", "past_key_names": PAST[0].replace("{}", "%d"),
                           "past_value_names": PAST[1].replace("{}", "%d")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT[0].replace("{}", "%d"),
                            "present_value_names": PRESENT[1].replace("{}", "%d")},
                "num_attention_heads": cfg.n_head,
                "num_hidden_layers": cfg.n_layer,
                "num_key_value_heads": cfg.n_kv_head,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": "decoder",
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": bool(ids.get("do_sample", False)), "early_stopping": True,
            "length_penalty": 1.0, "max_length": cfg.max_positions, "min_length": 0, "no_repeat_ngram_size": 0,
            "num_beams": 1, "num_return_sequences": 1,
            # The graph concatenates past and new keys (a present one longer than the past), so genai
            # cannot hand it one buffer for both.
            "past_present_share_buffer": False,
            "repetition_penalty": ids.get("repetition_penalty", 1.0), "temperature": ids.get("temperature", 1.0),
            "top_k": ids.get("top_k", 50), "top_p": ids.get("top_p", 1.0),
        },
    }


def verify(folder: Path, *, module=None, model=None, graphs: Path | None = None) -> dict:
    """Run the exported graph in onnxruntime and PyTorch on fresh random inputs of two shapes (a decoder's:
    a prompt with an empty past, and 2 tokens after 4 cached ones in a left-padded batch); raise if an
    output differs by more than 1e-4 of the outputs' scale or either side computes NaN or Inf. Returns
    the max abs differences."""
    import onnxruntime as ort
    folder = Path(folder)
    module = module or load_module(folder)
    model = model or module.ComposeForCausalLM.from_pretrained(folder, dtype=torch.float32)
    k = kind(module)
    result = {}
    for name in FILES:
        path = (graphs or folder) / name
        if not path.is_file():
            continue
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs = [o.name for o in session.get_outputs()]
        worst = limit = 0.0
        for batch, seq, past, pad, seed in ((1, 9, 0, (), 101), (3, 2, 4, (0, 3, 1), 202)):
            if k == "single":
                inputs = _inputs(module, model, k, batch, seq, seed, past=past, pad=pad)
                where = f"batch {batch}, sequence {seq}, past {past}" + (f", left padding {pad}" if pad else "")
                reference = _Decoder(model, module)
            else:
                seq = 17 if past else seq
                inputs = _inputs(module, model, k, batch, seq, seed)
                where, reference = f"batch {batch}, sequence {seq}", model
            got = session.run(None, {n: t.numpy() for n, t in inputs.items()})
            with torch.no_grad():
                ref = reference(*inputs.values())
            ref = [r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))]
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
