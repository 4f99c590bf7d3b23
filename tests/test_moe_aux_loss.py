"""The generated module's MoE load-balancing loss equals transformers' (load_balancing_loss_func, reported
as aux_loss with output_router_logits=True) times router_aux_loss_coef, on the same weights and tokens."""
from __future__ import annotations

import pytest
import torch

from compose import build, load, moe
from test_codegen import import_module
from conftest import load_hf, token_ids

SPECS = {
    "mixtral": lambda: moe.upcycle(load("tiny:llama?layers=3"), num_experts=4, top_k=2, noise=0.02, seed=1,
                                   aux_loss_coef=0.02),
    # Dense layer 0, then MoE layers: only the MoE layers' routing counts.
    "qwen2_moe": lambda: moe.fine_grained(load("tiny:llama?layers=3"), segments=2, routed=6, shared=1, top_k=3,
                                          noise=0.02, first_k_dense=1, norm_topk_prob=False),
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def built(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "out"
    build(SPECS[request.param](), out, formats=["hf", "torch"], progress=False)
    return out, import_module(out / "modeling_compose.py")


def test_aux_loss_matches_transformers(built):
    out, mod = built
    ref = load_hf(out)
    ids = token_ids(batch=3, seq=17)
    with torch.no_grad():
        hf_aux = ref(ids, output_router_logits=True).aux_loss
    for dispatch in ("grouped_mm", "loop", "dense"):
        mine = mod.ComposeForCausalLM.from_pretrained(out).train()
        for m in mine.modules():
            if isinstance(m, mod.SparseMoE):
                m.dispatch = dispatch
        mine(ids)
        aux = mine.aux_loss()
        torch.testing.assert_close(aux, ref.config.router_aux_loss_coef * hf_aux, rtol=1e-6, atol=0)
        # The coefficient is the build's, and can be overridden.
        torch.testing.assert_close(mine.aux_loss(coef=1.0), hf_aux, rtol=1e-6, atol=0)
        aux.backward()  # differentiable: it reaches every router
        routers = [m.gate.weight for m in mine.modules() if isinstance(m, mod.SparseMoE)]
        assert routers and all(w.grad is not None and w.grad.abs().sum() > 0 for w in routers)


def test_aux_loss_needs_a_training_forward(built):
    out, mod = built
    mine = mod.ComposeForCausalLM.from_pretrained(out)  # eval mode: nothing recorded
    with torch.no_grad():
        mine(token_ids(seq=5))
    with pytest.raises(RuntimeError, match="training mode"):
        mine.aux_loss()
