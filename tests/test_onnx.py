"""ONNX export of every kind of composed model, checked in onnxruntime against PyTorch on fresh inputs of
two shapes (batch and sequence dynamic; decoders with an empty past and with a left-padded cached one), and
decoders on a left-padded batch against transformers' own class on the same batch."""
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
def test_export_matches_pytorch_in_onnxruntime(onnx_build, name):
    out = onnx_build(name, SPECS[name])
    record = json.loads((out / "compose.json").read_text())["onnx"]
    single = name not in ("calm", "cogvlm")
    assert record["files"] == (["model.onnx", "genai_config.json"] if single else ["model.onnx"])
    assert record["opset"] >= 18
    assert all(d <= 1e-4 for d in record["check"].values()), record
    assert onnx.verify(out).keys() == record["check"].keys()  # `compose verify` re-runs the same check
    if single and "auto_map" not in json.loads((out / "config.json").read_text()):
        _padded_batch_matches_transformers(out)


def _padded_batch_matches_transformers(out):
    """A prompt batch left-padded to the longest of rows of 11, 6 and 2 tokens, with the position_ids
    transformers' generate makes from the mask: model.onnx's logits at every real token equal those of
    transformers' class for config.json on the same batch (its masks, its sliding windows on cache
    indices). Padding positions compute nothing anyone reads, and are not compared."""
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    lengths = (11, 6, 2)
    ids = torch.randint(3, 512, (len(lengths), max(lengths)), generator=torch.Generator().manual_seed(7))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, max(lengths) - n:] = 1
    ids = ids.masked_fill(mask == 0, 0)
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # GenerationMixin.prepare_inputs_for_generation
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = onnx.prompt_inputs(session, ids.numpy())
    feed.update(attention_mask=mask.numpy(), position_ids=position_ids.numpy())
    got = torch.from_numpy(session.run(["logits"], feed)[0])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert torch.isfinite(got).all()
    assert (got[real] - want[real]).abs().max().item() <= 1e-4 * max(1.0, want[real].abs().max().item())


def test_decoder_has_optimums_interface(onnx_build):
    """Names, order and axes as Optimum's own export of a Llama has them; an empty past of the width
    Optimum's ORTModelForCausalLM feeds a Mixtral (num_attention_heads heads of hidden_size / heads: its
    table of kv-head counts has no mixtral) runs, and gives the logits of a true-width empty past."""
    import numpy as np
    import onnxruntime as ort

    out = onnx_build("mixtral", SPECS["mixtral"])
    s = ort.InferenceSession(str(out / "model.onnx"))
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    ins, outs = {i.name: i.shape for i in s.get_inputs()}, {o.name: o.shape for o in s.get_outputs()}
    assert list(ins) == ["input_ids", "attention_mask", "position_ids", *past]
    assert list(outs) == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert ins["input_ids"] == ins["position_ids"] == ["batch_size", "sequence_length"]
    assert ins["attention_mask"] == ["batch_size", "past_sequence_length + sequence_length"]
    assert [ins[past[0]][0], ins[past[0]][2]] == ["batch_size", "past_sequence_length"]
    assert outs["present.0.key"] == ["batch_size", 2, "past_sequence_length + sequence_length", 16]
    assert outs["logits"] == ["batch_size", "sequence_length", 512]
    ids = np.array([[5, 17, 99], [300, 12, 8]])
    feed = onnx.prompt_inputs(s, ids)
    assert feed[past[0]].shape == (2, 2, 0, 16)
    optimum = {**feed, **{p: np.zeros((2, 4, 0, 64 // 4), dtype=np.float32) for p in past}}
    assert np.array_equal(s.run(["logits"], optimum)[0], s.run(["logits"], feed)[0])
    wrong = {**feed, **{p: np.zeros((2, 4, 1, 16), dtype=np.float32) for p in past}}
    wrong.update(attention_mask=np.ones((2, 4), dtype=np.int64))
    with pytest.raises(Exception, match="Reshape"):  # a real past of the wrong width still fails
        s.run(None, wrong)
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
    for name in (f for f in record["files"] if f.endswith(".onnx")):
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
    # As an earlier compose exported it: a second graph, model_with_past.onnx, recorded in compose.json.
    from compose.integrity import record_files

    (out / "model_with_past.onnx").write_bytes(b"an old graph")
    old = json.loads((out / "compose.json").read_text())
    old = record_files(out, {**old, "onnx": {"files": ["model_with_past.onnx"]}}, ["model_with_past.onnx"])
    (out / "compose.json").write_text(json.dumps(old))
    assert main(["export", str(out), "--format", "onnx"]) == 0
    record = json.loads((out / "compose.json").read_text())
    assert record["onnx"]["files"] == ["model.onnx", "genai_config.json"]
    # The old graph is gone with its record: no file in the folder that compose.json does not describe.
    assert not (out / "model_with_past.onnx").exists()
    assert "model_with_past.onnx" not in record["files"] and "model_with_past.onnx" not in record["sha256"]
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
    with pytest.raises(BuildError, match=r"--format onnx needs onnxscript: pip install 'compose-llm\[onnx\]'"):
        build(load(TINY), tmp_path / "b", formats=["hf", "onnx"], progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
