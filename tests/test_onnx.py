"""ONNX export of every kind of composed model, checked in onnxruntime against PyTorch on fresh inputs of
two shapes (batch and sequence dynamic; with-past graphs also with an empty past)."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from compose import build, calm, expand_blocks, load, merge, moe, visual_expert  # noqa: E402
from compose.backends import onnx  # noqa: E402
from compose.backends.torch import load_module  # noqa: E402
from compose.errors import BuildError  # noqa: E402

TINY = "tiny:llama?layers=2"
SPECS = {
    "expanded": lambda: expand_blocks(load(TINY), groups=1),
    "qwen3": lambda: expand_blocks(load("tiny:qwen3?layers=2"), groups=1),  # q/k norms, head_dim of its own
    "qwen3_moe": lambda: moe.upcycle(load("tiny:qwen3?layers=2"), num_experts=4, top_k=2, noise=0.02),
    "phi3": lambda: expand_blocks(load("tiny:phi3?layers=2"), groups=1),  # fused q/k/v and gate/up
    # Gemma's norms, soft-caps and scaled embedding, over sequences longer than the window of 4; in both, the
    # second layer is global (Gemma 3's with a rope of its own).
    "gemma2": lambda: load("tiny:gemma2?layers=2&window=4"),
    "gemma3": lambda: load("tiny:gemma3?layers=2&window=4&pattern=2"),
    "merged_mistral": lambda: merge.linear([load("tiny:mistral?layers=2&window=4"),
                                            load("tiny:mistral?layers=2&window=4&seed=1")], weights=[0.5, 0.5]),
    "mixtral": lambda: moe.upcycle(load(TINY), num_experts=4, top_k=2, noise=0.02),
    # No transformers class: generated code with stacked experts and an always-on shared expert.
    "gemma2_moe": lambda: moe.fine_grained(load("tiny:gemma2?layers=2&window=4"), segments=2, routed=4, shared=1,
                                           top_k=2, noise=0.02),
    "deepseek": lambda: moe.fine_grained(load("tiny:qwen2?layers=2"), segments=2, routed=4, shared=1, top_k=2,
                                         preserve=True, noise=0.02),
    "calm": lambda: calm(anchor=load(TINY), augment=load("tiny:qwen2?layers=2&hidden=96&heads=4"), every=1),
    "cogvlm": lambda: visual_expert(load(TINY), vision_width=24),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_export_matches_pytorch_in_onnxruntime(tmp_path, name):
    out = build(SPECS[name](), tmp_path / "out", formats=["hf", "onnx"], progress=False)
    record = json.loads((out / "compose.json").read_text())["onnx"]
    single = name not in ("calm", "cogvlm")
    assert record["files"] == (["model.onnx", "model_with_past.onnx"] if single else ["model.onnx"])
    assert record["opset"] >= 18
    assert all(d <= 1e-4 for d in record["check"].values()), record
    assert (out / "model.onnx").is_file()
    assert onnx.verify(out).keys() == record["check"].keys()  # `compose verify` re-runs the same check


def test_with_past_uses_optimum_names(tmp_path):
    import onnxruntime as ort

    out = build(SPECS["mixtral"](), tmp_path / "out", formats=["hf", "onnx"], progress=False)
    s = ort.InferenceSession(str(out / "model_with_past.onnx"))
    ins, outs = [i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()]
    assert ins == ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert outs == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    # The MoE stays sparse: a loop over experts with top-k, gathers and index_add, not a dense einsum.
    ops = {n.op_type for n in __import__("onnx").load(str(out / "model.onnx")).graph.node}
    assert {"TopK", "NonZero"} <= ops or "Loop" in ops or "ScatterND" in ops, sorted(ops)
    assert json.loads((out / "compose.json").read_text())["onnx"]["moe_dispatch"] == "loop"


def test_dense_moe_export_has_no_data_dependent_shapes(tmp_path):
    """--dense-moe: every expert runs on every token, weighted (0 where not chosen); still checked against
    PyTorch's sparse dispatch within 1e-4, and recorded."""
    import onnx as onnx_lib

    out = build(SPECS["deepseek"](), tmp_path / "out", formats=["hf", "onnx"], progress=False, dense_moe=True)
    record = json.loads((out / "compose.json").read_text())["onnx"]
    assert record["moe_dispatch"] == "dense" and all(d <= 1e-4 for d in record["check"].values())
    for name in record["files"]:
        ops = {n.op_type for n in onnx_lib.load(str(out / name)).graph.node}
        assert not ops & {"NonZero", "Loop", "ScatterND"}, (name, sorted(ops))
    with pytest.raises(BuildError, match="--dense-moe: .* has no MoE layers"):
        build(load(TINY), tmp_path / "dense", formats=["hf", "onnx"], progress=False, dense_moe=True)
    with pytest.raises(BuildError, match="--dense-moe: applies to the ONNX export"):
        build(SPECS["mixtral"](), tmp_path / "x", formats=["hf"], progress=False, dense_moe=True)
    assert not (tmp_path / "dense").exists()


def test_a_failing_export_names_the_node(tmp_path):
    """An op the exporter cannot handle (a Python branch on data) is reported with the IR node it sits in."""
    out = build(load(TINY), tmp_path / "out", formats=["hf", "torch"], progress=False)
    module = load_module(out)
    model = module.ComposeForCausalLM.from_pretrained(out)
    layer = model.model.layers[1]
    original = layer.forward

    def data_dependent(x, *args):
        if float(x.sum()) > 0:  # not exportable: the graph would depend on the data
            return original(x, *args)
        return original(-x, *args)

    layer.forward = data_dependent
    with pytest.raises(BuildError, match=r"at node layers\.1 \(model\.layers\.1"):
        onnx._export(model, {"input_ids": torch.randint(0, 512, (2, 5))}, ["logits"], tmp_path / "x.onnx", "single")


def test_cli_export_and_verify(tmp_path):
    from compose.cli import main

    out = build(load(TINY), tmp_path / "out", formats=["hf", "torch"], progress=False)
    assert main(["verify", str(out)]) == 2  # nothing exported yet: a clear error
    assert main(["export", str(out), "--format", "onnx"]) == 0
    assert json.loads((out / "compose.json").read_text())["onnx"]["files"] == ["model.onnx", "model_with_past.onnx"]
    assert main(["verify", str(out)]) == 0


def test_onnx_refusals_come_before_any_weight_is_written(tmp_path, monkeypatch):
    """At 3B, a refusal after the weights cost minutes and gigabytes: each one is made before hf.write."""
    import importlib.util

    from compose.backends import hf

    monkeypatch.setattr(hf, "write", lambda *a, **k: pytest.fail("weights were written before the refusal"))
    with pytest.raises(BuildError, match="--dense-moe: the model has no MoE layers"):
        build(load(TINY), tmp_path / "a", formats=["hf", "onnx"], progress=False, dense_moe=True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    with pytest.raises(BuildError, match=r"--format onnx needs onnxscript: pip install 'compose\[onnx\]'"):
        build(load(TINY), tmp_path / "b", formats=["hf", "onnx"], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
