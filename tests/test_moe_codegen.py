"""The generated MoE layer against transformers' own Mixtral, Qwen2-MoE and Qwen3-MoE on the same weights: the
grouped_mm dispatch, the loop over experts and the dense dispatch all within 1e-5 in float32, with ties in the routing and
with every token routed to one expert."""
from __future__ import annotations

import pytest
import torch

from compose import build, load, moe
from test_codegen import import_module
from conftest import load_hf, logits, token_ids

SPECS = {
    "mixtral": lambda src: moe.upcycle(load(src), num_experts=4, top_k=2, noise=0.02, seed=1),
    "qwen2_moe": lambda src: moe.fine_grained(load(src), segments=4, routed=8, shared=2, top_k=3, noise=0.02,
                                              norm_topk_prob=False, first_k_dense=2),
    "qwen3_moe": lambda src: moe.fine_grained(load(src), segments=2, routed=6, top_k=2, noise=0.02, first_k_dense=1),
}
SOURCE = {"mixtral": "llama", "qwen2_moe": "llama", "qwen3_moe": "qwen3"}
CLASS = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}


@pytest.fixture(scope="module", params=sorted(SPECS))
def built(request, hf_models, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    build(SPECS[request.param](str(hf_models[SOURCE[request.param]])), out, formats=["hf", "torch"], progress=False)
    return request.param, out, import_module(out / "modeling_compose.py")


def _pair(built, dispatch):
    kind, out, mod = built
    ref = load_hf(out)
    assert type(ref).__name__ == CLASS[kind]
    mine = mod.ComposeForCausalLM.from_pretrained(out)
    for m in mine.modules():
        if isinstance(m, mod.SparseMoE):
            m.dispatch = dispatch
    return ref, mine


@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop", "dense"])
def test_generated_moe_matches_transformers(built, dispatch):
    ref, mine = _pair(built, dispatch)
    ids = token_ids(seq=33)
    with torch.no_grad():
        torch.testing.assert_close(mine(ids), logits(ref, ids), rtol=0, atol=1e-5)


def test_state_dict_names_are_transformers_in_memory_names(built):
    """With q/k/v and gate/up fused (the fusion passes), unfused_state() gives transformers' names, and
    transformers' own state dict loads into the fused module (the load hooks concatenate)."""
    kind, out, mod = built
    ref, mine = _pair(built, "grouped_mm")
    tied = {"lm_head.weight"} if ref.config.tie_word_embeddings else set()  # one matrix, listed once by ours
    want = sorted(k for k in ref.state_dict() if "rotary" not in k and k not in tied)
    assert sorted(mod.unfused_state(mine)) == want
    assert any(k.endswith(".qkv_proj.weight") for k in mine.state_dict())
    fresh = mod.ComposeForCausalLM.from_pretrained(out)
    fresh.load_state_dict({k: v for k, v in ref.state_dict().items() if k in want}, strict=True)
    ids = token_ids(seq=9)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), logits(ref, ids), rtol=0, atol=1e-5)


def _moe_blocks(model):
    return [l.mlp for l in model.model.layers if hasattr(l.mlp, "gate")]


@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop", "dense"])
@pytest.mark.parametrize("routing", ["ties", "one_expert"])
def test_routing_edge_cases(built, dispatch, routing):
    """Ties: a zero router makes every expert equally likely. One expert: a router whose row 0 dominates
    sends every token to expert 0 (the others get no rows: empty groups)."""
    ref, mine = _pair(built, dispatch)
    with torch.no_grad():
        for a, b in zip(_moe_blocks(ref), _moe_blocks(mine)):
            w = torch.zeros_like(a.gate.weight)
            if routing == "one_expert":
                w[0] = 5.0 * torch.sign(torch.randn(w.shape[1], generator=torch.Generator().manual_seed(0)))
            a.gate.weight.copy_(w)
            b.gate.weight.copy_(w)
        ids = token_ids(seq=20)
        torch.testing.assert_close(mine(ids), logits(ref, ids), rtol=0, atol=1e-5)


def test_moe_layer_alone_with_all_tokens_on_one_expert(built):
    """At the layer level: hidden states chosen so the router's top-1 is expert 0 for every token."""
    ref, mine = _pair(built, "grouped_mm")
    a, b = _moe_blocks(ref)[0], _moe_blocks(mine)[0]
    x = torch.randn(3, 7, a.gate.weight.shape[1], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        w = torch.zeros_like(a.gate.weight)
        w[0] = 1.0
        a.gate.weight.copy_(w)
        b.gate.weight.copy_(w)
        x = x.abs()  # x @ w[0] > 0 = the others: expert 0 wins for every token
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-5)
        b.dispatch = "loop"
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-5)


def test_torch_export_with_dynamic_shapes(built):
    """Under torch.export the layer takes the loop over experts (grouped_mm has no export path in fp32)."""
    _, mine = _pair(built, "auto")
    ids = token_ids(seq=9)
    B, T = torch.export.Dim("B", min=1, max=8), torch.export.Dim("T", min=2, max=64)
    ep = torch.export.export(mine, (ids,), dynamic_shapes=({0: B, 1: T},))
    other = token_ids(batch=3, seq=17, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(other), mine(other), rtol=0, atol=1e-6)
