"""MoE construction: upcycling, fine-grained (DeepSeekMoE) and from-experts models load in transformers'
own classes and compute what the issue says: the dense function at init, or experts bit-identical to
their sources."""
from __future__ import annotations

import pytest
import torch

from compose import build, load, moe
from conftest import load_hf, logits, manifest, read_tensors, save_hf_model, token_ids


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_upcycle_matches_the_dense_model(tmp_path, hf_models, family):
    src = hf_models[family]
    out = build(moe.upcycle(load(str(src)), num_experts=8, top_k=2), tmp_path / "out", progress=False)
    dense, sparse = load_hf(src), load_hf(out)
    want = "Qwen2MoeForCausalLM" if family == "qwen2" else "MixtralForCausalLM"
    assert type(sparse).__name__ == want
    ids = token_ids(seq=40)
    torch.testing.assert_close(logits(sparse, ids), logits(dense, ids), rtol=0, atol=1e-5)


def test_upcycle_writes_legacy_mixtral_keys_and_they_are_copies(tmp_path, hf_models):
    src = hf_models["llama"]
    out = build(moe.upcycle(load(str(src)), num_experts=4, top_k=2), tmp_path / "out", progress=False)
    got, want = read_tensors(out), read_tensors(src)
    for i in range(8):
        for e in range(4):
            for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                assert torch.equal(got[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"],
                                   want[f"model.layers.{i}.mlp.{proj}.weight"])
        assert got[f"model.layers.{i}.block_sparse_moe.gate.weight"].shape == (4, 64)
    assert not any(".mlp." in k for k in got)


def test_upcycle_with_zero_router_is_bit_identical(tmp_path, hf_models):
    """A zero router gives top-2 weights of exactly 1/2 and 1/2: y/2 + y/2 == y in floating point."""
    src = hf_models["llama"]
    out = build(moe.upcycle(load(str(src)), num_experts=8, top_k=2, router=moe.zeros()), tmp_path / "o",
                progress=False)
    ids = token_ids()
    assert torch.equal(logits(load_hf(out), ids), logits(load_hf(src), ids))


@pytest.mark.parametrize("shared", [0, 2])
def test_fine_grained_preserve_is_the_dense_function(tmp_path, hf_models, shared):
    src = hf_models["llama"]
    spec = moe.fine_grained(load(str(src)), segments=4, routed=16, shared=shared, top_k=4, preserve=True)
    out = build(spec, tmp_path / "out", progress=False)
    model = load_hf(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (16, 4, 32)
    assert cfg.shared_expert_intermediate_size == 128
    ids = token_ids(seq=40)
    torch.testing.assert_close(logits(model, ids), logits(load_hf(src), ids), rtol=0, atol=1e-5)
    m = manifest(out)
    assert m["cost"]["active_params"] < m["cost"]["params"]
    assert all(l["identity_at_init"] is False for l in m["layers"])


def test_fine_grained_segments_are_row_blocks(tmp_path, hf_models):
    src = hf_models["llama"]
    spec = moe.fine_grained(load(str(src)), segments=4, routed=8, shared=2, top_k=2)
    out = build(spec, tmp_path / "out", progress=False)
    got, want = read_tensors(out), read_tensors(src)
    p, w = "model.layers.3.mlp.", 32
    for e in range(8):
        j = e % 4
        assert torch.equal(got[f"{p}experts.{e}.gate_proj.weight"], want[p + "gate_proj.weight"][j * w:(j + 1) * w])
        assert torch.equal(got[f"{p}experts.{e}.up_proj.weight"], want[p + "up_proj.weight"][j * w:(j + 1) * w])
        assert torch.equal(got[f"{p}experts.{e}.down_proj.weight"], want[p + "down_proj.weight"][:, j * w:(j + 1) * w])
    # Shared experts 0 and 1 are segments 0 and 1, concatenated; the gate is zero and down doubled.
    assert torch.equal(got[p + "shared_expert.gate_proj.weight"], want[p + "gate_proj.weight"][:64])
    assert torch.equal(got[p + "shared_expert.down_proj.weight"], 2 * want[p + "down_proj.weight"][:, :64])
    assert torch.count_nonzero(got[p + "shared_expert_gate.weight"]) == 0
    load_hf(out)  # loads without missing or unexpected keys


@pytest.fixture(scope="module")
def expert_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("experts")
    return [save_hf_model(root / f"e{i}", "llama", seed=10 + i) for i in range(4)]


def test_from_experts_takes_each_ffn_from_its_model(tmp_path, hf_models, expert_models):
    base = hf_models["llama"]
    spec = moe.from_experts(base=load(str(base)), experts=[load(str(e)) for e in expert_models], top_k=2,
                            router=moe.random(seed=3, std=0.5))
    out = build(spec, tmp_path / "out", progress=False)
    got, b = read_tensors(out), read_tensors(base)
    for e, folder in enumerate(expert_models):
        x = read_tensors(folder)
        for i in range(8):
            for w, proj in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                assert torch.equal(got[f"model.layers.{i}.block_sparse_moe.experts.{e}.{w}.weight"],
                                   x[f"model.layers.{i}.mlp.{proj}.weight"])
    for k, t in b.items():
        if ".mlp." not in k:
            assert torch.equal(got[k], t), k
    rows = got["model.layers.0.block_sparse_moe.gate.weight"]
    assert rows.shape == (4, 64) and 0.4 < rows.std() < 0.6
    assert type(load_hf(out)).__name__ == "MixtralForCausalLM"
