"""SOLAR depth up-scaling and passthrough stacking: every output layer is its source layer, bit for bit,
and layers no slice uses are never read."""
from __future__ import annotations

import copy

import pytest
import torch

from compose import build, depth_upscale, layers, load, stack
from compose.sources import open_source
from conftest import DENSE, load_hf, logits, manifest, read_tensors, save_hf_model, token_ids


def test_depth_upscale_8_layers_drop_2(tmp_path, hf_models):
    src = hf_models["llama"]
    out = build(depth_upscale(load(str(src)), drop=2), tmp_path / "solar", progress=False)
    got, want = read_tensors(out), read_tensors(src)

    order = list(range(0, 6)) + list(range(2, 8))  # [0, n-drop) then [drop, n)
    assert load_hf(out).config.num_hidden_layers == 12
    for out_i, src_i in enumerate(order):
        keys = [k for k in want if k.startswith(f"model.layers.{src_i}.")]
        assert keys
        for k in keys:
            assert torch.equal(got[k.replace(f".{src_i}.", f".{out_i}.", 1)], want[k])
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(got[k], want[k])
    assert [l["source_layer"] for l in manifest(out)["layers"]] == order


@pytest.mark.parametrize("family", [n for n in DENSE if n != "llama"])  # llama: the test above, per tensor
def test_upscaled_logits_equal_transformers_with_its_layers_restacked(tmp_path, hf_models, family):
    """Reference: transformers' own model with its decoder layers re-stacked in SOLAR's order."""
    src = hf_models[family]
    out = build(depth_upscale(load(str(src)), drop=2), tmp_path / "solar", progress=False)
    ref = load_hf(src)
    order = list(range(0, 6)) + list(range(2, 8))
    ref.model.layers = torch.nn.ModuleList(copy.deepcopy(ref.model.layers[i]) for i in order)
    for i, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = i
    ref.config.num_hidden_layers = 12
    if getattr(ref.config, "layer_types", None):  # each layer keeps its own kind of attention
        ref.config.layer_types = [ref.config.layer_types[i] for i in order]
    ids = token_ids(seq=24)
    built = load_hf(out)
    assert getattr(built.config, "layer_types", None) == getattr(ref.config, "layer_types", None)
    assert torch.equal(logits(ref, ids), logits(built, ids))


def test_stack_of_two_models_reads_only_the_layers_it_uses(tmp_path):
    a = save_hf_model(tmp_path / "a", "llama", seed=10)
    b = save_hf_model(tmp_path / "b", "llama", seed=11)
    out = build(stack(layers(load(str(a)), 0, 6), layers(load(str(b)), 2, 8)), tmp_path / "out", progress=False)

    read_a = {k.split(".")[2] for k in open_source(str(a.resolve())).reads if k.startswith("model.layers.")}
    read_b = {k.split(".")[2] for k in open_source(str(b.resolve())).reads if k.startswith("model.layers.")}
    assert read_a == {str(i) for i in range(0, 6)}
    assert read_b == {str(i) for i in range(2, 8)}
    # mergekit's passthrough rule: embeddings from the first slice's model, norm and head from the last's.
    assert not any(k.startswith("model.embed") for k in open_source(str(b.resolve())).reads)
    assert not any(k.startswith(("model.norm", "lm_head")) for k in open_source(str(a.resolve())).reads)

    got, ta, tb = read_tensors(out), read_tensors(a), read_tensors(b)
    assert torch.equal(got["model.layers.5.mlp.up_proj.weight"], ta["model.layers.5.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.6.mlp.up_proj.weight"], tb["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], tb["model.norm.weight"])
    assert torch.equal(got["lm_head.weight"], tb["lm_head.weight"])


def test_methods_compose_upscale_then_expand(tmp_path, hf_models):
    from compose import expand_blocks

    src = hf_models["qwen2"]
    solar = build(depth_upscale(load(str(src)), drop=2), tmp_path / "solar", progress=False)
    pro = build(expand_blocks(depth_upscale(load(str(src)), drop=2), groups=3), tmp_path / "pro", progress=False)
    ids = token_ids()
    assert load_hf(pro).config.num_hidden_layers == 15
    assert torch.equal(logits(load_hf(solar), ids), logits(load_hf(pro), ids))
    # A build's output is another spec's input.
    again = build(expand_blocks(load(str(solar)), groups=3), tmp_path / "again", progress=False)
    assert read_tensors(again).keys() == read_tensors(pro).keys()
    assert all(torch.equal(read_tensors(again)[k], v) for k, v in read_tensors(pro).items())


def test_layers_of_different_families_are_not_stacked(tmp_path, hf_models):
    """Qwen3 normalises q and k per head and Llama does not: one model cannot hold both kinds of layer."""
    from compose.errors import SpecError
    from compose.pipeline import compile_graph

    spec = stack(layers(load(str(hf_models["qwen3"])), 0, 4), layers(load(str(hf_models["llama"])), 4, 8))
    with pytest.raises(SpecError, match=r"model.slices\[1\].*family llama.*qwen3|model.slices\[1\].*qwen3.*llama"):
        compile_graph(spec)
