"""LLaMA-Pro block expansion: the built model loads in transformers and computes the source's function
exactly (zeroed o_proj/down_proj add exactly 0), with the new blocks where the paper puts them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compose import build, expand_blocks, load
from conftest import DENSE, FAMILY_CASES, load_hf, logits, manifest, read_tensors, token_ids


@pytest.mark.parametrize("family", DENSE)
def test_expansion_is_bit_identical_in_transformers(tmp_path, hf_models, family):
    src = hf_models[family]
    out = build(expand_blocks(load(str(src)), groups=4, per_group=1), tmp_path / "out", progress=False)

    base, expanded = load_hf(src), load_hf(out)
    assert type(expanded) is type(base)
    assert expanded.config.num_hidden_layers == 12
    ids = token_ids(seq=40)  # longer than the sliding windows of 16
    # Gemma normalises each sublayer's output too: the zero output of an identity block normalises to 0.
    assert torch.equal(logits(base, ids), logits(expanded, ids))
    if getattr(base.config, "layer_types", None):  # each copy slides (or not) as the layer it copies
        t = base.config.layer_types
        assert expanded.config.layer_types == [x for i in range(0, 8, 2) for x in (t[i], t[i + 1], t[i + 1])]


# The tensor-by-tensor check on a few layouts (for CI time; the test above runs every family): plain, q/k/v
# biases with a tied head, q/k norms, sandwich norms.
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_new_blocks_placement_weights_and_trainable_names(tmp_path, hf_models, family):
    src = hf_models[family]
    out = build(expand_blocks(load(str(src)), groups=4, per_group=1), tmp_path / "out", progress=False)
    got, want = read_tensors(out), read_tensors(src)

    # 8 layers in groups of 2, one copy after each group: source layer i -> output index,
    # and the copy of the group's last layer right after it.
    new_at = {2: 1, 5: 3, 8: 5, 11: 7}
    old_at = {0: 0, 1: 1, 3: 2, 4: 3, 6: 4, 7: 5, 9: 6, 10: 7}
    for out_i, src_i in {**old_at, **new_at}.items():
        names = [k for k in want if k.startswith(f"model.layers.{src_i}.")]
        for k in names:
            o = k.replace(f"model.layers.{src_i}.", f"model.layers.{out_i}.")
            if out_i in new_at and ("o_proj" in k or "down_proj" in k):
                assert torch.count_nonzero(got[o]) == 0, o
            else:
                assert torch.equal(got[o], want[k]), o

    m = manifest(out)
    assert [l["index"] for l in m["layers"] if l["new"]] == sorted(new_at)
    assert all(l["identity_at_init"] == l["new"] for l in m["layers"])
    expected_trainable = sorted(k for k in got if any(k.startswith(f"model.layers.{i}.") for i in new_at))
    assert sorted(m["trainable"]) == expected_trainable
    if FAMILY_CASES[family].tie:
        assert "lm_head.weight" not in got and expanded_is_tied(out)


def expanded_is_tied(folder) -> bool:
    model = load_hf(folder)
    return model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_explicit_positions_and_several_per_group(tmp_path, hf_models):
    out = build(expand_blocks(load(str(hf_models["llama"])), positions=[0, 7], per_group=2), tmp_path / "o",
                progress=False)
    layers = manifest(out)["layers"]
    assert [(l["source_layer"], l["new"]) for l in layers] == (
        [(0, False), (0, True), (0, True)] + [(i, False) for i in range(1, 8)] + [(7, True), (7, True)])
    base, expanded = load_hf(hf_models["llama"]), load_hf(out)
    ids = token_ids()
    assert torch.equal(logits(base, ids), logits(expanded, ids))


def test_builtin_tiny_model_through_the_cli(tmp_path):
    """The README's second command: the built-in tiny Llama, expanded, equals the unexpanded build."""
    from compose.cli import main

    spec = Path(__file__).parents[1] / "specs" / "llama_pro.py"
    assert main(["build", str(spec), "-o", str(tmp_path / "pro")]) == 0
    build(load("tiny:llama"), tmp_path / "plain", progress=False)
    ids = token_ids()
    assert torch.equal(logits(load_hf(tmp_path / "plain"), ids), logits(load_hf(tmp_path / "pro"), ids))
