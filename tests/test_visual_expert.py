"""CogVLM visual experts: text-only input is the language model, exactly; image tokens use the visual
expert; patches share one rotary position; only the experts and the adapter train, and they learn."""
from __future__ import annotations

import pytest
import torch

from compose import build, load, visual_expert
from conftest import DENSE, load_hf, logits, manifest, read_tensors, save_hf_model, token_ids
from test_codegen import import_module
from test_errors import assert_clean_failure, write

WIDTH = 96


@pytest.fixture(scope="module", params=DENSE)
def vlm(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vlm_{request.param}")
    base = save_hf_model(root / "base", request.param, seed=4, layers=4)
    out = build(visual_expert(load(str(base)), vision_width=WIDTH), root / "out", progress=False)
    plain = build(load(str(base)), root / "plain", formats=["hf", "torch"], progress=False)
    return base, out, plain


def _module(folder):
    return import_module(folder / "modeling_compose.py").ComposeForCausalLM.from_pretrained(folder)


def _image_batch(B=2, T=24, start=3, patches=6, seed=0):
    ids = token_ids(batch=B, seq=T, seed=seed)
    types = torch.zeros_like(ids)
    types[:, start:start + patches + 2] = 1  # begin-of-image, patches, end-of-image
    images = torch.randn(B, patches, WIDTH, generator=torch.Generator().manual_seed(seed))
    return ids, types, images


def test_text_only_is_the_language_model_exactly(vlm):
    base, out, plain = vlm
    ids = token_ids(seq=30)  # past mistral's window of 16
    model = _module(out)
    with torch.no_grad():
        got = model(ids)
        assert torch.equal(got, _module(plain)(ids))
        assert torch.equal(model(ids, torch.zeros_like(ids)), got)
    torch.testing.assert_close(got, logits(load_hf(base), ids), rtol=0, atol=1e-5)


def test_position_ids_and_expert_mask_follow_cogvlm(vlm):
    _, out, _ = vlm
    mod = import_module(out / "modeling_compose.py")
    types = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0, 0]])  # text, text, boi, 3 patches, eoi, text, text
    assert mod.build_position_ids(types).tolist() == [[0, 1, 2, 3, 3, 3, 4, 5, 6]]
    assert mod.vision_expert_mask(types).tolist() == [[False, False, True, True, True, True, False, False, False]]
    assert mod.patch_mask(types).tolist() == [[False, False, False, True, True, True, False, False, False]]


def test_image_tokens_use_the_visual_expert(vlm):
    """Perturbing a visual-expert weight of layer 0 changes layer 0's output at the begin-of-image token
    and the patches, and nowhere else."""
    _, out, _ = vlm
    model = _module(out)
    ids, types, images = _image_batch()
    seen = []
    model.model.layers[0].register_forward_hook(lambda _m, _i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model(ids, types, images)
        model.model.layers[0].vision_expert.mlp.down_proj.weight.add_(0.1)
        model(ids, types, images)
    changed = (seen[1] - seen[0]).abs().amax(dim=-1) > 0  # (B, T)
    expert = torch.zeros_like(changed)
    expert[:, 3:3 + 7] = True  # begin-of-image and the 6 patches; not the end-of-image token
    assert torch.equal(changed, expert)


def test_image_tokens_take_the_visual_experts_queries(vlm):
    """Perturbing the visual expert's query rows (of q_proj, or of Phi-3's fused qkv_proj) changes layer 0's
    output exactly at the expert's tokens: the projection is chosen per token, then split."""
    _, out, _ = vlm
    model = _module(out)
    ids, types, images = _image_batch()
    attn = model.model.layers[0].vision_expert.self_attn
    q = attn.qkv_proj.weight[:attn.n_head * attn.head_dim] if hasattr(attn, "qkv_proj") else attn.q_proj.weight
    seen = []
    model.model.layers[0].register_forward_hook(lambda _m, _i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model(ids, types, images)
        q.add_(0.1)
        model(ids, types, images)
    changed = (seen[1] - seen[0]).abs().amax(dim=-1) > 0  # (B, T)
    expert = torch.zeros_like(changed)
    expert[:, 3:3 + 7] = True
    assert torch.equal(changed, expert)


def test_loads_through_auto_map_and_generates(vlm):
    from transformers import AutoModelForCausalLM

    _, out, _ = vlm
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    model = _module(out)
    ids, types, images = _image_batch()
    with torch.no_grad():
        assert torch.equal(hf(ids, token_type_ids=types, images=images).logits, model(ids, types, images))
        full = model(ids, types, images)
        cache = import_module(out / "modeling_compose.py").CogVLMCache()
        steps = [model(ids[:, :12], types[:, :12], images, cache)]
        steps += [model(ids[:, t:t + 1], types[:, t:t + 1], None, cache) for t in range(12, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    tokens = model.generate(ids[:, :12], 3, types[:, :12], images)
    assert tokens.shape == (2, 15)


def test_bad_runtime_input_is_named(vlm):
    _, out, _ = vlm
    model = _module(out)
    ids, types, images = _image_batch()
    with pytest.raises(ValueError, match="token_type_ids has shape"):
        model(ids, types[:, :-1], images)
    with pytest.raises(ValueError, match="patches per sample"):
        model(ids, types, images[:, :-1])
    with pytest.raises(ValueError, match="no images were given"):
        model(ids, types)


def test_only_the_experts_and_adapter_train(vlm):
    _, out, _ = vlm
    m = manifest(out)
    names = set(read_tensors(out))
    assert sorted(m["trainable"]) == sorted(n for n in names if ".vision_expert." in n or n.startswith("vision_adapter."))
    model = _module(out).train()
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(m["trainable"])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    ids, types, images = _image_batch()
    loss = torch.nn.functional.cross_entropy(model(ids, types, images)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    assert model.vision_adapter.fc1.weight.grad is not None


def test_training_lowers_the_loss(tmp_path):
    """The token after the image is one of 4, set by which prototype image was shown; the language model
    is frozen, so the loss falls only if gradients flow through the adapter and the visual experts.
    (The built-in tiny Llama: its head is large enough to move the logits far.)"""
    out = build(visual_expert(load("tiny:llama?layers=4"), vision_width=WIDTH), tmp_path / "o", progress=False)
    model = _module(out).train()
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    protos = torch.randn(4, 6, WIDTH, generator=g)
    losses = []
    for _ in range(150):
        label = torch.randint(0, 4, (8,), generator=g)
        images = protos[label] + 0.1 * torch.randn(8, 6, WIDTH, generator=g)
        ids = torch.full((8, 12), 7)
        types = torch.zeros_like(ids)
        types[:, 1:9] = 1
        logits_ = model(ids, types, images)[:, 9]  # the end-of-image position predicts the next token
        loss = torch.nn.functional.cross_entropy(logits_, 100 + label)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-10:]) / 10
    assert last < first - 3.0, (first, last)


def test_bad_vision_width(tmp_path):
    spec = write(tmp_path / "s.py", "from compose import load, visual_expert\n"
                                    "model = visual_expert(load('tiny:llama'), vision_width=0)\n")
    assert_clean_failure(tmp_path, spec, "visual_expert.vision_width", "greater than 0")
