"""Merging whole models: the DSL, parameter resolution, determinism, the IR, and bad input."""
from __future__ import annotations


import pytest
import torch

from compose import build, depth_upscale, expand_blocks, layers, load, merge
from compose.errors import SpecError
from compose.ir import print_graph
from compose.pipeline import compile_graph
from conftest import load_hf, logits, read_tensors, save_hf_model, token_ids


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return save_hf_model(root / "a", "qwen2", seed=1, layers=4, tie=True), \
        save_hf_model(root / "b", "qwen2", seed=2, layers=4, tie=True)


def test_sphinx_beta_mix_is_the_weighted_sum(tmp_path, pair):
    a, b = pair
    beta = 0.7
    out = build(merge.linear([load(str(a)), load(str(b))], weights=[beta, 1 - beta]), tmp_path / "o", progress=False)
    got, ta, tb = read_tensors(out), read_tensors(a), read_tensors(b)
    assert got.keys() == ta.keys()
    for k in ta:
        torch.testing.assert_close(got[k], beta * ta[k] + (1 - beta) * tb[k], rtol=1e-6, atol=1e-7)
    model = load_hf(out)  # tied embeddings stay tied
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_slerp_endpoints_reproduce_the_models_exactly(tmp_path, pair):
    a, b = pair
    ids = token_ids()
    for t, src in ((0.0, a), (1.0, b)):
        out = build(merge.slerp(load(str(a)), load(str(b)), t=t), tmp_path / f"t{t}", progress=False)
        torch.testing.assert_close(logits(load_hf(out), ids), logits(load_hf(src), ids), rtol=1e-5, atol=1e-5)


def test_gradients_and_filters_resolve_per_layer(pair):
    a, b = pair
    g = compile_graph(merge.slerp(load(str(a)), load(str(b)), t={"self_attn": [0.0, 0.6], "mlp": [0.9, 0.0], "*": 0.35}))
    t_of = lambda name, key: dict(dict(g.op(name).params())[key].params)["t"]
    # 4 layers: t = 0, 1/3, 2/3, 1 along the gradient [0, 0.6] -> 0, 0.2, 0.4, 0.6
    assert [round(t_of(f"layers.{i}", "self_attn.q_proj.weight"), 6) for i in range(4)] == [0.0, 0.2, 0.4, 0.6]
    assert [round(t_of(f"layers.{i}", "mlp.up_proj.weight"), 6) for i in range(4)] == [0.9, 0.6, 0.3, 0.0]
    assert t_of("layers.2", "input_layernorm.weight") == 0.35
    assert dict(g.embedding.params()["weight"].params)["t"] == 0.35


def test_per_model_parameters_win_over_the_merge_parameters(pair):
    a, b = pair
    g = compile_graph(merge.ties(base=load(str(a)), models=[(load(str(b)), {"density": 0.2})], density=0.9, weights=[1.0]))
    e = g.op("layers.0").params()["mlp.up_proj.weight"]
    assert dict(e.params)["density"] == (0.2,) and e.base == 1  # the base is appended after the models


def test_random_methods_are_deterministic_for_a_seed(tmp_path, pair):
    a, b = pair
    spec = lambda seed: merge.dare_ties(base=load(str(a)), models=[load(str(b))], density=0.5, weights=[1.0], seed=seed)
    one = read_tensors(build(spec(7), tmp_path / "one", progress=False))
    two = read_tensors(build(spec(7), tmp_path / "two", progress=False))
    other = read_tensors(build(spec(8), tmp_path / "other", progress=False))
    k = "model.layers.1.mlp.up_proj.weight"
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert not torch.equal(one[k], other[k])
    # about half the delta survives, doubled (DARE rescales by 1/density)
    delta = one[k] - read_tensors(a)[k]
    assert 0.4 < (delta != 0).float().mean() < 0.6


def test_merged_models_compose_with_the_other_methods(tmp_path, pair):
    a, b = pair
    m = merge.linear([load(str(a)), load(str(b))], weights=[0.5, 0.5])
    out = build(expand_blocks(depth_upscale(m, drop=1), groups=2), tmp_path / "o", progress=False)
    assert load_hf(out).config.num_hidden_layers == 8
    plain = build(depth_upscale(m, drop=1), tmp_path / "p", progress=False)
    ids = token_ids()
    assert torch.equal(logits(load_hf(out), ids), logits(load_hf(plain), ids))
    # and the merged model's slices merge again
    again = compile_graph(merge.linear([layers(m, 0, 2), layers(load(str(a)), 2, 4)], weights=[1, 1]))
    assert len(again.blocks()) == 2


def test_ir_shows_the_merge_per_block(pair):
    a, b = pair
    text = print_graph(compile_graph(merge.ties(base=load(str(a)), models=[load(str(b))], density=0.5, weights=[1.0])))
    assert "%layers.1 = DecoderBlock(ties of %0 layer 1, %1 layer 1)" in text
    assert "* <- ties([%0:model.layers.1.*, %1:model.layers.1.*], base=1, density=(0.5,)" in text


def test_fold_removes_single_model_passthrough(tmp_path):
    g = compile_graph(merge.passthrough([load("tiny:llama?layers=2")]))
    assert "passthrough" not in print_graph(g)
    assert "* <- %0:model.layers.1.*" in print_graph(g)


# -- bad input -------------------------------------------------------------------------------------------

def test_shape_mismatch_names_the_tensor_and_the_models():
    with pytest.raises(SpecError, match=r"model.models\[1\]: model.embed_tokens.weight has shape \[512, 128\] there "
                                        r"but \[512, 64\] in model.models\[0\]"):
        compile_graph(merge.linear([load("tiny:llama?layers=2"), load("tiny:llama?layers=2&hidden=128")], weights=[1, 1]))


def test_method_that_needs_a_base():
    with pytest.raises(SpecError, match=r"model.base: merge method 'ties' needs a base model"):
        compile_graph(merge.ties([load("tiny:llama?layers=2"), load("tiny:llama?layers=2&seed=1")], weights=[1, 1]))


def test_density_outside_the_unit_interval():
    with pytest.raises(SpecError, match=r"model.models\[0\].parameters.density: density 1.5 is outside \(0, 1\]"):
        compile_graph(merge.ties(base=load("tiny:llama?layers=2"), models=[load("tiny:llama?layers=2&seed=1")],
                                 density=[1.5], weights=[1.0]))


def test_gradient_longer_than_the_layers():
    with pytest.raises(SpecError, match=r"model.parameters.t: a gradient of 5 values is longer than the 2 layers"):
        compile_graph(merge.slerp(load("tiny:llama?layers=2"), load("tiny:llama?layers=2&seed=1"),
                                  t=[0.1, 0.2, 0.3, 0.4, 0.5]))


def test_filter_that_matches_nothing():
    with pytest.raises(SpecError, match=r"model.parameters.t\['self_atn'\]: filter 'self_atn' matches no tensor"):
        compile_graph(merge.slerp(load("tiny:llama?layers=2"), load("tiny:llama?layers=2&seed=1"),
                                  t={"self_atn": 0.3, "*": 0.5}))


def test_unknown_method_and_parameter():
    with pytest.raises(SpecError, match="merge.tiez: unknown merge method 'tiez'"):
        merge.merge("tiez", [load("tiny:llama")])
    with pytest.raises(SpecError, match=r"merge.slerp.density: slerp has no parameter 'density'"):
        merge.slerp(load("tiny:llama"), load("tiny:llama?seed=1"), t=0.5, density=0.3)


def test_different_depths_are_refused():
    with pytest.raises(SpecError, match=r"model.models\[1\]: 3 layers, but model.models\[0\] has 2"):
        compile_graph(merge.linear([load("tiny:llama?layers=2"), load("tiny:llama?layers=3")], weights=[1, 1]))


def test_output_bytes_do_not_depend_on_workers(tmp_path, pair):
    a, b = pair
    spec = merge.ties(base=load(str(a)), models=[load(str(b)), load(str(a))], density=[0.4, 0.7], weights=[1.0, 0.5])
    one = build(spec, tmp_path / "one", workers=1, max_shard_size="200KB", progress=False)
    three = build(spec, tmp_path / "three", workers=3, max_shard_size="200KB", progress=False)
    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in three.iterdir()) and len(files) > 4
    for f in files:
        assert (one / f).read_bytes() == (three / f).read_bytes(), f


def test_prefetch_keeps_order_and_budget():
    import threading
    import time

    from compose.backends.shards import prefetch

    live, peak, lock = [0], [0], threading.Lock()

    def produce(x):
        with lock:
            live[0] += x
            peak[0] = max(peak[0], live[0])
        time.sleep(0.01)
        return x

    out = []
    for x in prefetch([5, 1, 1, 5, 1, 1, 1, 5], produce, workers=3, cost=lambda x: x, budget=6):
        out.append(x)
        with lock:
            live[0] -= x
    assert out == [5, 1, 1, 5, 1, 1, 1, 5]
    assert peak[0] <= 6  # never two 5s at once


@pytest.mark.parametrize("density", [0.1, 0.4, 0.75])
def test_fast_top_k_selects_what_the_sort_selects_even_with_ties(density):
    """TIES keeps the largest |delta|; compose selects with kthvalue and falls back to the full sort only
    when the tie at the threshold needs the sort's order. The kept entries equal the sort's in all cases."""
    from compose.merges.sparsify import magnitude

    g = torch.Generator().manual_seed(0)
    for t in (torch.randn(100_000, generator=g),                                   # ties rare
              torch.randn(100_000, generator=g).bfloat16().float(),                # many ties
              torch.randn(100_000, generator=g) * (torch.rand(100_000, generator=g) < 0.3)):  # mostly zeros
        k = max(1, int(density * t.numel()))
        mask = torch.zeros(t.numel(), dtype=t.dtype)
        mask[torch.argsort(t.abs(), descending=True)[:k]] = 1
        assert torch.equal(magnitude(t.clone(), density), t * mask)


@pytest.mark.parametrize("n,density", [(1, 0.5), (17, 0.3), (4099, 0.9), (1_000_003, 0.1)])
def test_dare_mask_is_torch_bernoulli_draw_for_draw(n, density):
    """compose draws DARE masks as rand < p; torch.bernoulli(p) makes the same draws, so a seed means
    the same mask in both (and in mergekit, which calls torch.bernoulli)."""
    from compose.merges.sparsify import bernoulli_mask

    t = torch.zeros(n)
    ours = bernoulli_mask(t, density, torch.Generator().manual_seed(3))
    ref = torch.bernoulli(torch.full((n,), density), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours.float(), ref)
