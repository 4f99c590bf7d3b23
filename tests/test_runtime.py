"""The runtime: static-cache generation equals transformers' greedy generate on the same weights, and the
generated modules' own decoding; sampling is seeded; the CUDA-graph path runs where there is a GPU."""
from __future__ import annotations

import pytest
import torch

from compose import build, calm, load, moe, visual_expert
from compose.backends import runtime
from conftest import load_hf, save_hf_model, token_ids


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    llama = save_hf_model(root / "llama", "llama", seed=5, layers=3)
    mistral = save_hf_model(root / "mistral", "mistral", seed=6, layers=3)  # window 16
    out = {
        "llama": build(load(str(llama)), root / "o_llama", formats=["hf", "torch"], progress=False),
        "mistral": build(load(str(mistral)), root / "o_mistral", formats=["hf", "torch"], progress=False),
        "mixtral": build(moe.upcycle(load(str(llama)), num_experts=4, top_k=2, noise=0.05), root / "o_mix",
                         formats=["hf", "torch"], progress=False),
        "calm": build(calm(anchor=load("tiny:llama?layers=2"), augment=load("tiny:qwen2?layers=2"), every=1),
                      root / "o_calm", progress=False),
        "cogvlm": build(visual_expert(load("tiny:llama?layers=2"), vision_width=8), root / "o_vlm", progress=False),
    }
    return out


@pytest.mark.parametrize("name", ["llama", "mistral", "mixtral"])
def test_static_cache_greedy_equals_transformers_generate(builds, name):
    module, model = runtime.load(builds[name])
    ids = token_ids(batch=2, seq=7, seed=3)
    ours = runtime.generate(module, model, ids, 14)  # 21 tokens: past mistral's window of 16
    ref = load_hf(builds[name]).generate(ids, max_new_tokens=14, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(ours, ref)
    assert torch.equal(ours, model.generate(ids, 14))  # the generated module's own (growing) cache


@pytest.mark.parametrize("name", ["calm", "cogvlm"])
def test_composite_builds_generate_with_their_caches(builds, name):
    module, model = runtime.load(builds[name])
    ids = token_ids(batch=2, seq=6, seed=4)
    assert torch.equal(runtime.generate(module, model, ids, 5), model.generate(ids, 5))


def test_sampling_is_seeded(builds):
    module, model = runtime.load(builds["mixtral"])
    ids = token_ids(batch=1, seq=4)
    a = runtime.generate(module, model, ids, 12, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    b = runtime.generate(module, model, ids, 12, temperature=1.0, top_k=40, top_p=0.9, seed=7)
    c = runtime.generate(module, model, ids, 12, temperature=1.0, top_k=40, top_p=0.9, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_one_is_greedy(builds):
    module, model = runtime.load(builds["llama"])
    ids = token_ids(batch=2, seq=5)
    assert torch.equal(runtime.generate(module, model, ids, 6, temperature=0.7, top_k=1, seed=1),
                       runtime.generate(module, model, ids, 6))


def test_cli_generate(builds, capsys):
    from compose.cli import main

    assert main(["generate", str(builds["llama"]), "--prompt", "Once upon", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("<1>Once upon")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_cuda_graph_decoding_equals_eager(builds, name):
    module, model = runtime.load(builds[name], device="cuda", dtype="bfloat16")
    ids = token_ids(batch=1, seq=8).cuda()
    eager = runtime.generate(module, model, ids, 16, cuda_graph=False)
    assert torch.equal(runtime.generate(module, model, ids, 16, cuda_graph=True), eager)
