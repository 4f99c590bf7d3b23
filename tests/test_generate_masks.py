"""Padding masks and transformers' generate() on the generated models (CALM, CogVLM, and an MoE written as
generated code): a padded row's real tokens get the logits of the row alone, and
`AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).generate(...)` is transformers' own
GenerationMixin, giving the tokens of a greedy loop over the model's full forward (no cache), and at init
the tokens transformers' own class gives for the source model."""
from __future__ import annotations

import pytest
import torch

from compose import build, calm, load, moe, visual_expert
from conftest import load_hf, save_hf_model, token_ids
from test_codegen import import_module

WIDTH = 96  # vision features
PAD = 0  # the id padded positions hold (any token: the mask hides it)
LENGTHS = (21, 14, 9)  # rows of different lengths; the longest crosses the sources' windows of 16


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """kind -> (output folder, source folder transformers' own class reads)."""
    root = tmp_path_factory.mktemp("gen_masks")
    llama = save_hf_model(root / "llama", "llama", seed=1, layers=4)
    qwen2 = save_hf_model(root / "qwen2", "qwen2", seed=2, layers=4, hidden=128)
    gemma2 = save_hf_model(root / "gemma2", "gemma2", seed=3, layers=3, tie=True)
    gemma3 = save_hf_model(root / "gemma3", "gemma3", seed=4, layers=3, tie=True)
    out = {
        "calm": (build(calm(anchor=load(str(llama)), augment=load(str(qwen2)), every=2, heads=4), root / "calm",
                       formats=["hf", "torch"], progress=False), llama),
        # Gemma 2's sliding and global layers (a mask per layer type), soft-capped scores and logits.
        "calm_gemma": (build(calm(anchor=load(str(gemma2)), augment=load(str(llama)), every=2), root / "calm_gemma",
                             progress=False), gemma2),
        "cogvlm": (build(visual_expert(load(str(llama)), vision_width=WIDTH), root / "cogvlm", progress=False), llama),
        # Gemma 3: sliding layers with a rope of their own.
        "cogvlm_gemma": (build(visual_expert(load(str(gemma3)), vision_width=WIDTH), root / "cogvlm_gemma",
                               progress=False), gemma3),
        "moe": (build(moe.upcycle(load(str(gemma3)), num_experts=4, top_k=2), root / "moe", progress=False), gemma3),
    }
    return out


def standalone(folder):
    return import_module(folder / "modeling_compose.py").ComposeForCausalLM.from_pretrained(folder)


def remote(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@torch.no_grad()
def perturb(model):
    """The new layers moved off their init (CALM's cross-attention output starts at zero, CogVLM's visual
    expert as a copy of the language weights), so that the augmenting model and the expert routing reach the
    logits. Seeded by parameter name: the standalone and the transformers model get the same weights."""
    for name, p in model.named_parameters():
        if name.startswith("cross.") or ".vision_expert." in name:
            g = torch.Generator().manual_seed(sum(map(ord, name)))
            p.add_((0.5 if name.endswith("o_proj.weight") and name.startswith("cross.") else 0.05)
                   * torch.randn(p.shape, generator=g))
    return model


def pad(rows: list[torch.Tensor], side: str, value: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> (ids, attention_mask), padded on `side`."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), value, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        at = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[b, at], mask[b, at] = r, 1
    return ids, mask


def real(mask: torch.Tensor, b: int) -> torch.Tensor:
    return mask[b].bool()


def text_rows(seed=0):
    ids = token_ids(batch=len(LENGTHS), seq=max(LENGTHS), seed=seed)
    return [ids[b, :n] for b, n in enumerate(LENGTHS)]


def image_rows(patches=4, seed=0):
    """(token rows, type rows, images (B, patches, WIDTH)): each row has an image run
    [begin-of-image, patches, end-of-image] at a place of its own."""
    ids = text_rows(seed)
    types = []
    for b, r in enumerate(ids):
        t = torch.zeros_like(r)
        start = 1 + b  # after some text
        t[start:start + patches + 2] = 1
        types.append(t)
    images = torch.randn(len(ids), patches, WIDTH, generator=torch.Generator().manual_seed(seed))
    return ids, types, images


# -- forward(attention_mask=...) ------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["calm", "calm_gemma", "moe"])
def test_padded_rows_give_each_real_token_its_rows_logits(builds, kind, side):
    out, _ = builds[kind]
    rows = text_rows()
    ids, mask = pad(rows, side)
    for model in (perturb(standalone(out)), perturb(remote(out))):
        with torch.no_grad():
            got = model(ids, attention_mask=mask)
            got = got if torch.is_tensor(got) else got.logits
            for b, r in enumerate(rows):
                alone = model(r[None])
                alone = alone if torch.is_tensor(alone) else alone.logits
                torch.testing.assert_close(got[b, real(mask, b)], alone[0], rtol=0, atol=1e-5)
            if side == "left":  # the mask does work: without it the shorter rows' logits move
                unmasked = model(ids)
                unmasked = unmasked if torch.is_tensor(unmasked) else unmasked.logits
                assert (unmasked[2, real(mask, 2)] - got[2, real(mask, 2)]).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
def test_calm_hides_a_padded_augmenting_prompt(builds, side):
    """With augment_ids (the augmenting model's own prompt), its padding is hidden from the augmenting
    model and from every anchor query's cross-attention keys."""
    out, _ = builds["calm"]
    model = perturb(standalone(out))
    rows = text_rows()
    prompts = [token_ids(batch=1, seq=n, seed=10 + n)[0] for n in (6, 11, 3)]
    ids, mask = pad(rows, side)
    aug, aug_mask = pad(prompts, "right" if side == "left" else "left", value=7)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, augment_ids=aug, augment_attention_mask=aug_mask)
        for b, (r, p) in enumerate(zip(rows, prompts)):
            alone = model(r[None], augment_ids=p[None])
            torch.testing.assert_close(got[b, real(mask, b)], alone[0], rtol=0, atol=1e-5)
        unmasked = model(ids, attention_mask=mask, augment_ids=aug)
        assert (unmasked[2, real(mask, 2)] - got[2, real(mask, 2)]).abs().max() > 1e-3


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("kind", ["cogvlm", "cogvlm_gemma"])
def test_cogvlm_padded_rows_keep_their_experts_and_positions(builds, kind, side):
    """Image runs at different places in rows of different lengths: padding takes no rotary position and
    never the visual expert, so each real token's logits are the row's alone."""
    out, _ = builds[kind]
    rows, types, images = image_rows()
    ids, mask = pad(rows, side)
    tt, _ = pad(types, side, value=1)  # padding marked as image: the mask must still make it text
    for model in (perturb(standalone(out)), perturb(remote(out))):
        with torch.no_grad():
            got = model(ids, token_type_ids=tt, images=images, attention_mask=mask)
            got = got if torch.is_tensor(got) else got.logits
            for b, (r, t) in enumerate(zip(rows, types)):
                alone = model(r[None], token_type_ids=t[None], images=images[b:b + 1])
                alone = alone if torch.is_tensor(alone) else alone.logits
                torch.testing.assert_close(got[b, real(mask, b)], alone[0], rtol=0, atol=1e-5)


def test_position_ids_follow_the_mask(builds):
    mod = import_module(builds["cogvlm"][0] / "modeling_compose.py")
    types = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 0]])  # two pads, text, boi, 2 patches, eoi, text
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    assert mod.build_position_ids(types, mask).tolist() == [[0, 0, 0, 1, 2, 2, 3, 4]]
    lang = import_module(builds["cogvlm"][0] / "modeling_compose_language.py")
    assert lang.positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2, 3, 4, 5]]  # cumsum(mask) - 1


def test_a_mask_of_the_wrong_length_is_named(builds):
    model = standalone(builds["calm"][0])
    ids = token_ids(seq=8)
    with pytest.raises(ValueError, match="attention_mask covers 7 tokens"):
        model(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))


def test_what_the_wrapper_cannot_do_is_refused(builds):
    model = remote(builds["calm"][0])
    with pytest.raises(TypeError, match="does not take output_attentions"):
        model(token_ids(seq=8), output_attentions=True)


# -- generate() -----------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_alone(step, row: torch.Tensor, n: int, eos: int | None) -> list[int]:
    """The reference: n greedy tokens after `row` (unpadded, alone), each the argmax of a full forward over
    everything so far (no cache); after eos, the pad id, as transformers fills finished rows."""
    seq, out = row[None], []
    for _ in range(n):
        if out and out[-1] in (eos, PAD) and eos is not None:
            out.append(PAD)
            continue
        token = int(step(seq)[0, -1].argmax())
        out.append(token)
        seq = torch.cat((seq, torch.tensor([[token]])), dim=1)
    return out


def check_generated(got: torch.Tensor, prompt_len: int, want: list[list[int]]) -> None:
    new = got[:, prompt_len:].tolist()
    assert len(new[0]) <= len(want[0])
    assert new == [w[:len(new[0])] for w in want]


@pytest.mark.parametrize("kind", ["calm", "calm_gemma", "moe"])
def test_generate_is_transformers_and_matches_a_greedy_full_forward(builds, kind):
    out, _ = builds[kind]
    model = perturb(remote(out))
    ref = perturb(standalone(out))
    rows = text_rows(seed=3)
    plain = [greedy_alone(ref, r, 8, None) for r in rows]
    first = plain[0]
    at = next(i for i in range(2, 8) if first[i] not in first[:i])
    eos = first[at]  # a token the first row reaches (first at step `at`): it stops there, and is padded after
    want = [greedy_alone(ref, r, 8, eos) for r in rows]
    assert PAD not in first and want[0] == first[:at + 1] + [PAD] * (7 - at)
    ids, mask = pad(rows, "left")
    got = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, eos_token_id=eos,
                         pad_token_id=PAD, num_beams=1)
    check_generated(got, ids.size(1), want)
    assert torch.equal(model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, eos_token_id=eos,
                                      pad_token_id=PAD, use_cache=False), got)
    # The same settings as a generation_config.
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    assert torch.equal(model.generate(ids, attention_mask=mask, generation_config=config), got)
    # The standalone module's own greedy loop (no transformers) takes the mask too.
    assert ref.generate(ids, 8, attention_mask=mask)[:, ids.size(1):].tolist() == plain
    # Sampling: reproducible from the seed, and within the vocabulary.
    torch.manual_seed(0)
    a = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                       max_new_tokens=8, pad_token_id=PAD)
    torch.manual_seed(0)
    b = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
                       max_new_tokens=8, pad_token_id=PAD)
    assert torch.equal(a, b) and a.shape == (3, ids.size(1) + 8)


@pytest.mark.parametrize("kind", ["calm", "calm_gemma", "cogvlm", "cogvlm_gemma", "moe"])
def test_generate_at_init_is_the_sources_own_generate(builds, kind):
    """At init each build computes its source model exactly (text only, for CogVLM): transformers' generate
    on both gives the same tokens, greedy with padding and eos, and with beams (the cache reordered)."""
    out, src = builds[kind]
    ours, theirs = remote(out), load_hf(src)
    ids, mask = pad(text_rows(seed=5), "left")
    for args in ({"do_sample": False, "max_new_tokens": 8, "eos_token_id": 3, "num_beams": 1},
                 {"do_sample": False, "max_new_tokens": 6, "num_beams": 3, "num_return_sequences": 2}):
        want = theirs.generate(ids, attention_mask=mask, pad_token_id=PAD, **args)
        assert torch.equal(ours.generate(ids, attention_mask=mask, pad_token_id=PAD, **args), want), args


def test_calm_generate_with_a_padded_augmenting_prompt(builds):
    out, _ = builds["calm"]
    model, ref = perturb(remote(out)), perturb(standalone(out))
    rows = text_rows(seed=4)
    prompts = [token_ids(batch=1, seq=n, seed=20 + n)[0] for n in (5, 9, 2)]
    want = [greedy_alone(lambda s, p=p: ref(s, augment_ids=p[None]), r, 6, None) for r, p in zip(rows, prompts)]
    ids, mask = pad(rows, "left")
    aug, aug_mask = pad(prompts, "left")
    got = model.generate(ids, attention_mask=mask, augment_ids=aug, augment_attention_mask=aug_mask,
                         do_sample=False, max_new_tokens=6, pad_token_id=PAD)
    check_generated(got, ids.size(1), want)
    loop = ref.generate(ids, 6, augment_ids=aug, attention_mask=mask, augment_attention_mask=aug_mask)
    assert loop[:, ids.size(1):].tolist() == want


@pytest.mark.parametrize("kind", ["cogvlm", "cogvlm_gemma"])
def test_cogvlm_generate_with_images_matches_a_greedy_full_forward(builds, kind):
    """Left-padded rows with image runs: the types and images reach the prompt's forward, and the new tokens
    are text (the last row's prompt ends with its image run, whose type transformers would repeat)."""
    out, _ = builds[kind]
    model, ref = perturb(remote(out)), perturb(standalone(out))
    rows, types, images = image_rows(seed=6)
    assert types[-1][-1] == 1

    def step(b):
        def run(seq):  # the row so far, its new tokens text
            t = torch.cat((types[b], torch.zeros(seq.size(1) - len(types[b]), dtype=torch.long)))
            return ref(seq, token_type_ids=t[None], images=images[b:b + 1])
        return run

    want = [greedy_alone(step(b), r, 6, None) for b, r in enumerate(rows)]
    ids, mask = pad(rows, "left")
    tt, _ = pad(types, "left")
    got = model.generate(ids, attention_mask=mask, token_type_ids=tt, images=images, do_sample=False,
                         max_new_tokens=6, pad_token_id=PAD)
    check_generated(got, ids.size(1), want)
    # Without a cache every step reruns the whole sequence: the new tokens' types must be text there too.
    assert torch.equal(model.generate(ids, attention_mask=mask, token_type_ids=tt, images=images, do_sample=False,
                                      max_new_tokens=6, pad_token_id=PAD, use_cache=False), got)
    loop = ref.generate(ids, 6, token_type_ids=tt, images=images, attention_mask=mask)
    assert loop[:, ids.size(1):].tolist() == want


def test_the_padded_forward_exports(builds):
    """torch.export keeps the padded path with dynamic batch and sequence (the mask covers the sequence)."""
    from torch.export import Dim

    model = perturb(standalone(builds["calm"][0]))

    class Padded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, ids, mask):
            return self.model(ids, attention_mask=mask)

    ids, mask = pad(text_rows(), "left")
    batch, seq = Dim("batch", max=64), Dim("seq", max=256)
    exported = torch.export.export(Padded(), (ids, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    ids, mask = pad(text_rows(seed=9)[:2], "right")
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(ids, mask), model(ids, attention_mask=mask), rtol=0, atol=1e-6)
