"""CALM: two frozen models joined by cross-attention. At init the composed model is the anchor, exactly;
cross-attention is causal over the shared sequence; only the new layers train, and training them works."""
from __future__ import annotations

import pytest
import torch

from compose import build, calm, families, load
from conftest import DENSE, FAMILY_TYPES, load_hf, logits, manifest, read_tensors, save_hf_model, token_ids
from test_codegen import import_module
from test_errors import assert_clean_failure, write


@pytest.fixture(scope="module")
def calm_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("calm")
    anchor = save_hf_model(root / "anchor", "llama", seed=1, layers=8)
    augment = save_hf_model(root / "augment", "qwen2", seed=2, layers=4, hidden=128)
    out = build(calm(anchor=load(str(anchor)), augment=load(str(augment)), every=2, heads=4), root / "out",
                progress=False)
    plain = build(load(str(anchor)), root / "plain", formats=["hf", "torch"], progress=False)
    return anchor, augment, out, plain


def _module(folder):
    return import_module(folder / "modeling_compose.py").ComposeForCausalLM.from_pretrained(folder)


def test_default_pairs_follow_calm_pytorch():
    from compose.lower.calm import default_pairs

    assert default_pairs(8, 4, 2) == [(0, 0), (4, 2)]
    assert default_pairs(32, 32, 4) == [(0, 0), (4, 4), (8, 8), (12, 12), (16, 16), (20, 20), (24, 24), (28, 28)]
    assert default_pairs(2, 12, 4) == [(0, 0), (1, 4)]


def test_logits_equal_the_anchors_at_init(calm_build):
    anchor, _, out, plain = calm_build
    ids = token_ids(seq=30)
    composed = _module(out)
    with torch.no_grad():
        got = composed(ids)
        assert torch.equal(got, _module(plain)(ids))  # the same code path, plus exactly 0
    torch.testing.assert_close(got, logits(load_hf(anchor), ids), rtol=0, atol=1e-5)


def test_loads_through_auto_map_offline(calm_build):
    from transformers import AutoModelForCausalLM

    _, _, out, _ = calm_build
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    ids = token_ids(seq=20)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, _module(out)(ids))
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)


def _perturbed(folder):
    """The CALM module with its cross-attention output projections made non-zero, so the augmenting
    model's states reach the logits."""
    model = _module(folder)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for x in model.cross:
            x.o_proj.weight.copy_(0.5 * torch.randn(x.o_proj.weight.shape, generator=g))
    return model


def test_cross_attention_is_causal(calm_build):
    """Changing what the augmenting model sees at position t+1 never changes anchor logits at <= t."""
    _, _, out, _ = calm_build
    model = _perturbed(out)
    ids, t = token_ids(seq=16), 9

    def bump(_module, _inputs, output):
        output = output.clone()
        output[:, t + 1] += 3.0
        return output

    with torch.no_grad():
        before = model(ids)
        handle = model.augment.embed_tokens.register_forward_hook(bump)
        after = model(ids)
        handle.remove()
    assert torch.equal(after[:, :t + 1], before[:, :t + 1])
    assert (after[:, t + 1:] - before[:, t + 1:]).abs().max() > 1e-4


def test_generation_with_kv_caches_matches_full_forward(calm_build):
    _, _, out, _ = calm_build
    model = _perturbed(out)
    ids = token_ids(seq=12)
    with torch.no_grad():
        full = model(ids)
        cache = import_module(out / "modeling_compose.py").CalmCache()
        steps = [model(ids[:, :5], cache)] + [model(ids[:, t:t + 1], cache) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
        prompt = token_ids(seq=7, seed=3)
        fixed = model(ids, augment_ids=prompt)
        cache = import_module(out / "modeling_compose.py").CalmCache()
        steps = [model(ids[:, :5], cache, prompt)] + [model(ids[:, t:t + 1], cache, prompt) for t in range(5, 12)]
        torch.testing.assert_close(torch.cat(steps, 1), fixed, rtol=0, atol=1e-5)
    tokens = model.generate(ids[:, :4], max_new_tokens=5)
    with torch.no_grad():
        for t in range(4, 9):
            assert torch.equal(tokens[:, t], model(tokens[:, :t])[:, -1].argmax(-1))


def test_only_cross_attention_trains(calm_build):
    _, _, out, _ = calm_build
    m = manifest(out)
    got = read_tensors(out)
    assert sorted(m["trainable"]) == sorted(k for k in got if k.startswith("cross."))
    assert not any(k.startswith("augment.layers.3.") for k in got)  # above the last connection: dropped
    model = _module(out)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(m["trainable"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    ids = token_ids(seq=16)
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    assert all(p.grad is not None for p in model.cross.parameters())
    assert not torch.equal(model.cross[0].o_proj.weight, torch.zeros_like(model.cross[0].o_proj.weight))


def test_training_the_cross_attention_lowers_the_loss(calm_build):
    """Counting sequences (next token = this + 1), which the random anchor cannot predict: the loss falls
    only if gradients flow through the cross-attention layers and the context projections."""
    _, _, out, _ = calm_build
    model = _module(out).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        base = torch.randint(0, 32, (8, 1), generator=g)
        ids = (base + torch.arange(16)) % 512
        logits_ = model(ids)
        loss = torch.nn.functional.cross_entropy(logits_[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 1.0, (first, last)


CASES = {
    "pairs_out_of_range": ("model = calm(anchor=load('tiny:llama'), augment=load('tiny:qwen2?layers=4'), pairs=[(0, 0), (9, 1)])",
                           ["model.pairs[1]", "anchor layer 9", "8 layers"]),
    "augment_pair_out_of_range": ("model = calm(anchor=load('tiny:llama'), augment=load('tiny:qwen2?layers=4'), pairs=[(1, 4)])",
                                  ["model.pairs[0]", "augmenting layer 4", "4 layers"]),
    "vocabularies_differ": ("model = calm(anchor=load('tiny:llama'), augment=load('tiny:qwen2?vocab=600'))",
                            ["model.augment", "600", "512", "same tokenizer"]),
    "heads_not_dividing": ("model = calm(anchor=load('tiny:llama'), augment=load('tiny:qwen2'), heads=5)",
                           ["model.heads", "5 heads", "64"]),
    "calm_then_expand": ("from compose import expand_blocks\n"
                         "model = expand_blocks(calm(anchor=load('tiny:llama'), augment=load('tiny:qwen2')), groups=2)",
                         ["model.model", "CALM model cannot be expanded"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_calm_input(tmp_path, case):
    body, needles = CASES[case]
    spec = write(tmp_path / "s.py", "from compose import calm, load\n" + body + "\n")
    assert_clean_failure(tmp_path, spec, *needles)


def test_dot_draws_both_chains_and_the_cross_edges(tmp_path):
    from pathlib import Path

    from compose.cli import main

    spec = Path(__file__).parents[1] / "specs" / "calm.py"
    assert main(["inspect", str(spec), "--dot", str(tmp_path / "g.dot")]) == 0
    dot = (tmp_path / "g.dot").read_text()
    assert '"augment.layers.0" -> "xattn.0" [style=dashed, color=blue, label="cross"]' in dot
    assert '"augment.layers.2" -> "xattn.1" [style=dashed, color=blue, label="cross"]' in dot
    assert '"layers.0" -> "xattn.0";' in dot and '"xattn.0" -> "layers.1";' in dot
    assert '"augment.embed" -> "augment.layers.0";' in dot


# Every dense family but llama (the augmenting model here) and qwen2 (calm_build joins it to a llama; CI time).
@pytest.mark.parametrize("family", [n for n in DENSE if n not in ("llama", "qwen2")])
def test_an_anchor_of_another_family_augmented_by_a_llama_is_the_anchor_at_init(tmp_path, hf_models, family):
    """Families mix where the math allows: Mistral's sliding window, Qwen3's q/k-normed attention, Phi-3's
    fused projections, or
    Gemma's soft-capped, sandwich-normed layers read a Llama's hidden states."""
    anchor = hf_models[family]
    out = build(calm(anchor=load(str(anchor)), augment=load(str(hf_models["llama"])), every=4), tmp_path / "out",
                progress=False)
    ids = token_ids(seq=30)
    with torch.no_grad():
        got = _module(out)(ids)
    torch.testing.assert_close(got, logits(load_hf(anchor), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", [n for n in DENSE if families.get(FAMILY_TYPES[n]).features.norm == "offset_rms"])
def test_a_gemma_augmenting_model_gives_transformers_hidden_states(tmp_path, hf_models, family):
    """What the cross-attention reads from a Gemma augmenting model (its scaled embedding, 1 + w norms,
    soft-capped sliding and global layers) is each layer's output as transformers computes it."""
    src = hf_models[family]
    out = build(calm(anchor=load(str(hf_models["llama"])), augment=load(str(src)), every=1), tmp_path / "out",
                progress=False)
    ids = token_ids(seq=30)  # past the window of 16
    with torch.no_grad():
        got = _module(out).augment(ids)
        want = load_hf(src)(ids, output_hidden_states=True).hidden_states[1:]
    assert len(got) == 8
    for i, (g, w) in enumerate(zip(got, want[:-1])):  # the last one transformers gives is after the final norm
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5, msg=lambda m: f"layer {i}: {m}")
