"""Every rope type (default, linear, dynamic, llama3, yarn, longrope) and Qwen2's sliding layers, checked
against transformers itself: its rotary embedding module is the reference for the tables, its models for
the logits and for greedy generation, on sequences longer than the context the scaling starts at.

Sources are transformers' own models (LlamaConfig / Qwen2Config with rope_parameters), every weight
perturbed, saved with save_pretrained. The scaled types start at 32 positions (original_max_position_embeddings,
or max_position_embeddings for dynamic), and the sequences here run to 64.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from compose import build, expand_blocks, load
from compose.backends import runtime
from compose.backends.torch import load_module
from conftest import load_hf, save_hf_model, token_ids, traced_decode_step

ORIGINAL = 32
LONG = 64
ROPES = {
    "default": dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
    "linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "dynamic": dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                    max_position_embeddings=ORIGINAL),
    "llama3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": ORIGINAL},
                   max_position_embeddings=8 * ORIGINAL),
    "yarn": dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                  "original_max_position_embeddings": ORIGINAL}, max_position_embeddings=4 * ORIGINAL),
    "longrope": dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "factor": 4.0,
                                      "original_max_position_embeddings": ORIGINAL,
                                      "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                      "long_factor": [1.0 + 0.7 * i for i in range(8)]},
                     max_position_embeddings=4 * ORIGINAL),
}
# (family, rope): every type on Llama, and the long-context Qwen2.5 (yarn, q/k/v biases, tied head).
CASES = {**{name: ("llama", name) for name in ROPES}, "qwen2_yarn": ("qwen2", "yarn")}
ONNX = ("llama3", "qwen2_yarn", "dynamic", "longrope")
HAVE_ONNX = all(importlib.util.find_spec(m) for m in ("onnxscript", "onnxruntime"))  # not on the GPU image
SLIDING = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)  # layer 0 full, 1 and 2 slide


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case -> (transformers source folder, its compose build with the generated module)."""
    root = tmp_path_factory.mktemp("rope")
    out = {}
    for i, (case, (family, rope)) in enumerate(CASES.items()):
        extra = {"tie": True} if family == "qwen2" else {}
        src = save_hf_model(root / case, family, seed=20 + i, layers=2, perturb_all=True, **extra, **ROPES[rope])
        formats = ["hf", "torch", "onnx"] if case in ONNX and HAVE_ONNX else ["hf", "torch"]
        out[case] = (src, build(load(str(src)), root / f"{case}_out", formats=formats, progress=False))
    src = save_hf_model(root / "sliding", "qwen2", seed=30, layers=3, perturb_all=True, **SLIDING)
    out["qwen2_sliding"] = (src, build(load(str(src)), root / "sliding_out", formats=["hf", "torch"], progress=False))
    return out


def _ours(folder):
    module = load_module(folder)
    return module, module.ComposeForCausalLM.from_pretrained(folder)


@torch.no_grad()
def _ref_logits(src, ids):
    """transformers' logits, from a freshly loaded model (dynamic rope keeps state between calls)."""
    return load_hf(src)(ids).logits


@pytest.mark.parametrize("case", sorted(ROPES))
def test_rotary_tables_equal_transformers(models, case):
    """cos and sin of the generated module equal those of transformers' rotary embedding, bit for bit, below
    and past the length where the scaling changes; and the scaling is exercised (not the default tables)."""
    src, out = models[case]
    module, _ = _ours(out)
    default_module = load_module(models["default"][1])
    for T in (ORIGINAL // 2, LONG):
        rotary = load_hf(src).model.rotary_emb  # fresh: transformers' dynamic rope is stateful
        pos = torch.arange(T)
        want = rotary(torch.zeros(1), pos[None])
        got = module.rope_cos_sin(pos, module.Config(), torch.float32)
        assert torch.equal(got[0], want[0][0]) and torch.equal(got[1], want[1][0]), (case, T)
    if case != "default":
        base = default_module.rope_cos_sin(torch.arange(LONG), default_module.Config(), torch.float32)[0]
        assert not torch.equal(got[0], base), case


@pytest.mark.parametrize("case", sorted(CASES) + ["qwen2_sliding"])
def test_generated_module_matches_transformers(models, case):
    src, out = models[case]
    _, ours = _ours(out)
    for T in (ORIGINAL // 2 + 3, LONG):
        ids = token_ids(batch=2, seq=T, seed=T)
        with torch.no_grad():
            got = ours(ids)
        assert (got - _ref_logits(src, ids)).abs().max().item() <= 1e-5, (case, T)


@pytest.mark.parametrize("case", ["llama3", "qwen2_yarn", "dynamic", "longrope", "qwen2_sliding"])
def test_expand_blocks_is_bit_identical(models, tmp_path, case):
    src, _ = models[case]
    out = build(expand_blocks(load(str(src)), groups=1), tmp_path / "pro", progress=False)
    ids = token_ids(batch=2, seq=LONG)
    assert torch.equal(_ref_logits(out, ids), _ref_logits(src, ids))
    written = json.loads((out / "config.json").read_text())
    source = json.loads((src / "config.json").read_text())
    assert written["rope_parameters"] == source["rope_parameters"]


def test_qwen2_layer_types_follow_their_blocks(models, tmp_path):
    """Each block keeps its source layer's sliding or full attention, and config.json says so."""
    src, _ = models["qwen2_sliding"]
    out = build(expand_blocks(load(str(src)), positions=[0]), tmp_path / "pro", progress=False)  # copies layer 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
    assert (cfg["use_sliding_window"], cfg["sliding_window"], cfg["max_window_layers"]) == (True, 8, 2)
    # The window does work: without it, positions past 8 change.
    ids = token_ids(batch=2, seq=24)
    full = json.loads((src / "config.json").read_text())
    (tmp_path / "full").mkdir()
    for f in src.iterdir():
        (tmp_path / "full" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "full" / "config.json").write_text(json.dumps({**full, "use_sliding_window": False,
                                                                "layer_types": ["full_attention"] * 3}))
    diff = (_ref_logits(tmp_path / "full", ids) - _ref_logits(src, ids)).abs()
    assert diff[:, :8].max() <= 1e-6 and diff[:, 8:].max() > 1e-3


@pytest.mark.parametrize("case", sorted(CASES) + ["qwen2_sliding"])
def test_runtime_greedy_equals_transformers_generate(models, case):
    """Static-cache decoding through the boundary (prompt 24, 28 new tokens: positions past 32)."""
    src, out = models[case]
    module, model = runtime.load(out)
    ids = token_ids(batch=2, seq=24, seed=9)
    ours = runtime.generate(module, model, ids, 28)
    ref = load_hf(src).generate(ids, max_new_tokens=28, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(ours, ref), case


@pytest.mark.parametrize("case", ONNX)
def test_onnx_matches_transformers_past_the_boundary(models, case):
    """model.onnx on 64 tokens (an empty past), and on 2 tokens after 40 cached ones, in onnxruntime,
    within 1e-4 of transformers (for the second, transformers decoding the same 2 tokens on its own cache of
    the 40: dynamic rope rotates cached keys with the frequencies of their time, so no full forward equals it)."""
    if not HAVE_ONNX:
        pytest.skip("needs onnxscript and onnxruntime")
    import onnxruntime as ort

    src, out = models[case]
    assert all(d <= 1e-4 for d in json.loads((out / "compose.json").read_text())["onnx"]["check"].values())
    ids = token_ids(batch=2, seq=LONG, seed=5)
    want = _ref_logits(src, ids)
    from compose.backends.onnx import prompt_inputs

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["logits"], prompt_inputs(session, ids.numpy()))[0])
    assert (got - want).abs().max().item() <= 1e-4

    module, ours = _ours(out)
    cache = module.KVCache()
    with torch.no_grad():
        ours(ids[:, :40], cache)
    past = {}
    for i in range(ours.config.n_layer):
        past[f"past_key_values.{i}.key"] = cache.keys[i].numpy()
        past[f"past_key_values.{i}.value"] = cache.values[i].numpy()
    step = {"input_ids": ids[:, 40:42].numpy(), "attention_mask": torch.ones(2, 42, dtype=torch.int64).numpy(),
            "position_ids": torch.arange(40, 42).expand(2, 2).numpy()}
    got = torch.from_numpy(session.run(["logits"], {**step, **past})[0])
    ref = load_hf(src)
    with torch.no_grad():
        prefix = ref(ids[:, :40], use_cache=True)
        want = ref(ids[:, 40:42], past_key_values=prefix.past_key_values, use_cache=True).logits
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("case", sorted(CASES) + ["qwen2_sliding"])
def test_decode_step_past_the_boundary_traces_as_one_graph(models, case):
    """The rope choice (grown frequencies, long factors) is made on the device: a decode step past the
    boundary has no host read, so it traces whole (as CUDA-graph capture needs) and equals eager."""
    _, out = models[case]
    traced, expected = traced_decode_step(*runtime.load(out), token_ids(batch=2, seq=40, seed=9))
    assert torch.equal(traced, expected), case


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("case", ["dynamic", "longrope", "qwen2_yarn", "qwen2_sliding"])
def test_cuda_graph_decoding_equals_eager(models, case):
    module, model = runtime.load(models[case][1], device="cuda")
    ids = token_ids(batch=1, seq=24).cuda()
    eager = runtime.generate(module, model, ids, 20, cuda_graph=False)
    assert torch.equal(runtime.generate(module, model, ids, 20, cuda_graph=True), eager)
