"""Router initialisation from prompts: rows are what mergekit-moe computes, from transformers' own forward."""
from __future__ import annotations

import pytest
import torch

from compose import build, load, moe
from conftest import load_hf, read_tensors, save_hf_model

PROMPTS = [["def f(x):", "import numpy"], ["Once upon a time"], ["The derivative of"], ["Bonjour, je"]]
NEGATIVE = [[], ["def g():"], [], ["Hello"]]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("router")
    return [save_hf_model(root / f"m{i}", "llama", seed=20 + i, layers=4) for i in range(5)]


def _ids(text: str, vocab: int = 512, bos: int = 1) -> torch.Tensor:
    """The documented tokenisation of models without tokenizer files: bos, then UTF-8 bytes mod vocab."""
    return torch.tensor([[bos] + [b % vocab for b in text.encode()]])


def _build(tmp_path, folders, router):
    spec = moe.from_experts(base=load(str(folders[0])), experts=[load(str(f)) for f in folders[1:]], top_k=2,
                            router=router)
    out = build(spec, tmp_path / "out", progress=False)
    got = read_tensors(out)
    return out, torch.stack([got[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(4)])


def _hidden(model, text: str, last: bool) -> torch.Tensor:
    with torch.no_grad():
        hs = model(_ids(text), output_hidden_states=True).hidden_states
    h = torch.stack(hs[:-1])[:, 0]  # the state entering each layer: (layers, seq, hidden)
    return h[:, -1] if last else h.mean(1)


@pytest.mark.parametrize("average", [False, True])
def test_hidden_router_rows(tmp_path, folders, average):
    out, rows = _build(tmp_path, folders, moe.hidden_router(PROMPTS, NEGATIVE, average=average))
    base = load_hf(folders[0])
    for e, (pos, neg) in enumerate(zip(PROMPTS, NEGATIVE)):
        v = torch.stack([_hidden(base, p, not average) for p in pos]).mean(0)
        if neg:
            v = v - torch.stack([_hidden(base, p, not average) for p in neg]).mean(0)
        want = v / v.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(rows[:, e], want, rtol=0, atol=1e-6)
    assert torch.allclose(rows.norm(dim=-1), torch.ones(4, 4))
    load_hf(out)


def test_cheap_embed_router_rows(tmp_path, folders):
    _, rows = _build(tmp_path, folders, moe.cheap_embed(PROMPTS))
    embed = read_tensors(folders[0])["model.embed_tokens.weight"]
    for e, pos in enumerate(PROMPTS):
        s = sum(embed[_ids(p)[0]].sum(0) for p in pos)
        for i in range(4):  # one vector, every layer
            torch.testing.assert_close(rows[i, e], s / s.norm(), rtol=0, atol=1e-6)


def test_router_rows_from_a_composed_base(tmp_path, folders):
    """A base that is not one folder (a SOLAR up-scale) runs in transformers from the config and tensors its
    family writes, in memory: the rows are those of transformers' model of that base as compose builds it."""
    from compose import depth_upscale

    base = depth_upscale(load(str(folders[0])), drop=1)  # 6 layers
    experts = [depth_upscale(load(str(f)), drop=1) for f in folders[1:3]]
    out = build(moe.from_experts(base=base, experts=experts, router=moe.hidden_router(PROMPTS[:2])),
                tmp_path / "o", progress=False)
    assert load_hf(out).config.num_hidden_layers == 6
    got = read_tensors(out)
    rows = torch.stack([got[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(6)])
    written = load_hf(build(base, tmp_path / "base", progress=False))
    for e, pos in enumerate(PROMPTS[:2]):
        v = torch.stack([_hidden(written, p, True) for p in pos]).mean(0)
        torch.testing.assert_close(rows[:, e], v / v.norm(dim=-1, keepdim=True), rtol=0, atol=1e-6)


@pytest.mark.peer
def test_hidden_rows_equal_mergekits(tmp_path, folders):
    """mergekit-moe's own get_hidden_states, per prompt, on transformers' model of the base."""
    from transformers import BatchEncoding
    from mergekit.moe.router import get_hidden_states

    _, rows = _build(tmp_path, folders, moe.hidden_router(PROMPTS, NEGATIVE))
    base = load_hf(folders[0])

    def vec(prompts):
        return torch.stack([get_hidden_states(base, BatchEncoding({"input_ids": _ids(p)}), average=False)
                            for p in prompts]).mean(0)

    for e, (pos, neg) in enumerate(zip(PROMPTS, NEGATIVE)):
        v = vec(pos) - (vec(neg) if neg else 0)
        torch.testing.assert_close(rows[:, e], v / v.norm(dim=-1, keepdim=True), rtol=0, atol=1e-6)
