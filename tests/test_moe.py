"""MoE construction: upcycling, fine-grained (DeepSeekMoE) and from-experts models load in transformers'
own classes and compute what the issue says: the dense function at init, or experts bit-identical to
their sources."""
from __future__ import annotations

import pytest
import torch

from compose import build, families, load, moe
from conftest import (DENSE, FAMILY_CASES, FAMILY_TYPES, load_hf, logits, manifest, read_tensors, save_hf_model,
                      token_ids)


@pytest.mark.parametrize("family", [n for n in DENSE if families.get(FAMILY_TYPES[n]).moe_targets])
def test_upcycle_matches_the_dense_model(tmp_path, hf_models, family):
    """Every dense family with MoE classes: its upcycled model is the class its conftest.FAMILY_CASES entry
    names, and computes the dense function."""
    src = hf_models[family]
    out = build(moe.upcycle(load(str(src)), num_experts=8, top_k=2), tmp_path / "out", progress=False)
    dense, sparse = load_hf(src), load_hf(out)
    assert type(sparse).__name__ == FAMILY_CASES[family].upcycled
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


def test_built_moe_models_are_inputs_again(tmp_path, hf_models):
    """Methods compose: an upcycled Mixtral and a fine-grained Qwen2-MoE load as sources, and SOLAR-style
    up-scaling of them, or a merge of two, gives checkpoints transformers runs."""
    from compose import depth_upscale, merge

    src = hf_models["llama"]
    a = build(moe.upcycle(load(str(src)), num_experts=4, top_k=2), tmp_path / "a", progress=False)
    b = build(moe.upcycle(load(str(src)), num_experts=4, top_k=2, noise=0.01, seed=5), tmp_path / "b",
              progress=False)
    q = build(moe.fine_grained(load(str(src)), segments=4, routed=8, shared=2, top_k=2, preserve=True),
              tmp_path / "q", progress=False)
    ids = token_ids()
    for folder in (a, q):  # reloaded unchanged: the same tensors, the same logits
        again = build(load(str(folder)), tmp_path / f"{folder.name}2", progress=False)
        got, want = read_tensors(again), read_tensors(folder)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(logits(load_hf(again), ids), logits(load_hf(folder), ids))

    up = build(depth_upscale(load(str(a)), drop=2), tmp_path / "up", progress=False)
    assert load_hf(up).config.num_hidden_layers == 12
    mixed = build(merge.linear([load(str(a)), load(str(b))], weights=[0.5, 0.5]), tmp_path / "m", progress=False)
    got, wa, wb = read_tensors(mixed), read_tensors(a), read_tensors(b)
    k = "model.layers.2.block_sparse_moe.experts.1.w1.weight"
    torch.testing.assert_close(got[k], 0.5 * wa[k] + 0.5 * wb[k])
    assert type(load_hf(mixed)).__name__ == "MixtralForCausalLM"


def test_solar_then_upcycle(tmp_path, hf_models):
    from compose import depth_upscale

    src = hf_models["mistral"]
    up = depth_upscale(load(str(src)), drop=2)
    dense = build(up, tmp_path / "dense", progress=False)
    sparse = build(moe.upcycle(up, num_experts=4, top_k=2, router=moe.zeros()), tmp_path / "sparse",
                   progress=False)
    ids = token_ids(seq=40)
    assert torch.equal(logits(load_hf(sparse), ids), logits(load_hf(dense), ids))


@pytest.mark.parametrize("family", ["llama", "qwen3"])  # two MoE classes' fused layouts (CI time)
def test_fused_expert_checkpoints_load(tmp_path, hf_models, family):
    """transformers 5 and mergekit may write experts fused (`experts.gate_up_proj`): read them too (a
    Mixtral from a Llama, a Qwen3-MoE from a Qwen3)."""
    from safetensors.torch import save_file
    import shutil

    a = build(moe.upcycle(load(str(hf_models[family])), num_experts=4, top_k=2, noise=0.01), tmp_path / "a",
              progress=False)
    fused = tmp_path / "fused"
    shutil.copytree(a, fused)
    for f in fused.glob("*.safetensors*"):
        f.unlink()
    model = load_hf(a)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k not in tied}, fused / "model.safetensors")
    assert any("gate_up_proj" in k for k in read_tensors(fused))
    again = build(load(str(fused)), tmp_path / "again", progress=False)
    got, want = read_tensors(again), read_tensors(a)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_manifest_records_experts_routing_and_active_parameters(tmp_path, hf_models):
    out = build(moe.upcycle(load(str(hf_models["llama"])), num_experts=8, top_k=2, every=2), tmp_path / "o",
                progress=False)
    m = manifest(out)
    info = m["moe"]
    assert info["class"] == "Qwen2MoeForCausalLM"  # dense layers in between: Mixtral has none
    assert info["moe_layers"] == [1, 3, 5, 7] and info["routed_experts"] == 8 and info["top_k"] == 2
    expert = 3 * 64 * 128
    dense = {k: v.numel() for k, v in read_tensors(hf_models["llama"]).items()}
    router, shared_gate = 8 * 64, 64  # Qwen2-MoE's shared-expert gate (zero, before a zero-width expert)
    assert info["params"] == sum(dense.values()) + 4 * (7 * expert + router + shared_gate)
    assert info["active_params"] == sum(dense.values()) + 4 * (1 * expert + router + shared_gate)
    assert m["cost"]["active_params"] == info["active_params"]
    model = load_hf(out)
    assert info["params"] == model.num_parameters()  # what the checkpoint holds, counted by transformers
    ids = token_ids()
    torch.testing.assert_close(logits(model, ids), logits(load_hf(hf_models["llama"]), ids), rtol=0, atol=1e-5)


def test_qwen3_moe_from_a_qwen3_keeps_dense_layers_in_between(tmp_path, hf_models):
    """Qwen3-MoE has dense layers between (mlp_only_layers); with shared experts, which it has no place for,
    see test_moe_generated."""
    src = hf_models["qwen3"]
    spec = moe.fine_grained(load(str(src)), segments=2, routed=4, top_k=2, first_k_dense=1)
    out = build(spec, tmp_path / "out", progress=False)
    model = load_hf(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.mlp_only_layers == [0]
    assert (model.config.num_experts, model.config.moe_intermediate_size) == (4, 64)
    got, want = read_tensors(out), read_tensors(src)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], want["model.layers.0.mlp.up_proj.weight"])
    for e in range(4):  # expert e is segment e % 2 of the dense FFN
        rows = slice(64 * (e % 2), 64 * (e % 2 + 1))
        assert torch.equal(got[f"model.layers.3.mlp.experts.{e}.up_proj.weight"],
                           want["model.layers.3.mlp.up_proj.weight"][rows])
        assert torch.equal(got[f"model.layers.3.mlp.experts.{e}.down_proj.weight"],
                           want["model.layers.3.mlp.down_proj.weight"][:, rows])


def test_a_qwen3_moe_source_is_expanded_merged_and_upcycled_again(tmp_path, hf_models):
    """A build's output is another spec's input: Qwen3 -> Qwen3-MoE, then LLaMA-Pro on it, then a merge
    of it with itself (the same function), each loaded by transformers' own class."""
    from compose import expand_blocks, merge

    first = build(moe.upcycle(load(str(hf_models["qwen3"])), num_experts=4, top_k=2, noise=0.01), tmp_path / "moe",
                  progress=False)
    pro = build(expand_blocks(load(str(first)), groups=2), tmp_path / "pro", progress=False)
    mixed = build(merge.linear([load(str(first)), load(str(first))], weights=[0.5, 0.5]), tmp_path / "merged",
                  progress=False)
    ids = token_ids(seq=24)
    want = logits(load_hf(first), ids)
    assert type(load_hf(pro)).__name__ == "Qwen3MoeForCausalLM"
    assert torch.equal(logits(load_hf(pro), ids), want)
    torch.testing.assert_close(logits(load_hf(mixed), ids), want, rtol=0, atol=1e-5)
