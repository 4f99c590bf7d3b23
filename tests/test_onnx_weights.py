"""ONNX graphs of a bf16 build hold float16 weights (half the float32 file) and still match PyTorch in
onnxruntime; the fusion passes reach the graphs (one MatMul for q/k/v and one for gate/up per layer)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compose import build, load
from compose.backends.onnx import prompt_inputs
from compose.backends.torch import load_module

SPEC = "tiny:llama?layers=2"


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_weights")
    return {
        "bf16": build(load(SPEC), root / "bf16", formats=["hf", "onnx"], dtype="bfloat16", progress=False),
        "fp32_unfused": build(load(SPEC), root / "fp32", formats=["hf", "onnx"], progress=False, fuse=False),
    }


def _initializers(path):
    return onnx.load(str(path)).graph.initializer


def _matmuls(path) -> int:
    return sum(n.op_type in ("MatMul", "Gemm") for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_bf16_build_stores_float16_weights(builds):
    out = builds["bf16"]
    record = json.loads((out / "compose.json").read_text())["onnx"]
    assert record["weights"].startswith("float16") and record["compute"] == "float32"
    inits = _initializers(out / "model.onnx")
    half = sum(int(np.prod(i.dims)) for i in inits if i.data_type == onnx.TensorProto.FLOAT16)
    full = sum(int(np.prod(i.dims)) for i in inits if i.data_type == onnx.TensorProto.FLOAT)
    assert half > 50 * max(full, 1)  # the weights; only a few float32 constants stay
    # Half the bytes of the float32 graph of the same model.
    assert (out / "model.onnx").stat().st_size < 0.6 * (builds["fp32_unfused"] / "model.onnx").stat().st_size
    assert json.loads((builds["fp32_unfused"] / "compose.json").read_text())["onnx"]["weights"] == "float32"


def test_float16_weights_compute_what_pytorch_computes(builds):
    out = builds["bf16"]
    model = load_module(out).ComposeForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(5))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], prompt_inputs(session, ids.numpy()))[0]
    with torch.no_grad():
        ref = model(ids).numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_fused_graphs_have_one_matmul_for_qkv_and_one_for_gate_up(builds):
    """Per layer: q/k/v, o, gate/up, down, and attention's two; unfused, q, k, v and gate, up apart."""
    fused, plain = _matmuls(builds["bf16"] / "model.onnx"), _matmuls(builds["fp32_unfused"] / "model.onnx")
    assert plain - fused == 2 * (2 + 1)  # two layers, each two fewer for q/k/v and one fewer for gate/up


def test_verify_fails_when_the_graph_and_the_weights_disagree(builds, tmp_path):
    """The check is not vacuous: weights changed after the export make onnxruntime and PyTorch differ."""
    import shutil

    from safetensors.torch import load_file, save_file

    from compose.backends import onnx as onnx_backend
    from compose.errors import BuildError

    folder = tmp_path / "copy"
    shutil.copytree(builds["bf16"], folder)
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] * 1.01
    save_file(state, folder / "model.safetensors")
    with pytest.raises(BuildError, match="onnxruntime differs from PyTorch"):
        onnx_backend.verify(folder)
