"""The runtime: static-cache generation equals transformers' greedy generate on the same weights, and the
generated modules' own decoding, for every kind of build; sampling is seeded; the CUDA-graph path runs
where there is a GPU, its warm-up everywhere."""
from __future__ import annotations

import pytest
import torch

from compose import build, calm, load, moe, visual_expert
from compose.backends import runtime
from conftest import DENSE, FAMILY_CASES, load_hf, save_hf_model, token_ids, traced_decode_step


MOE_BUILDS = {
    # Each MoE class once, from a dense family's model by a recipe of its own (the class a recipe lands in is
    # the point of it): name -> (dense source, recipe).
    "mixtral": ("llama", lambda src: moe.upcycle(src, num_experts=4, top_k=2, noise=0.05)),
    "qwen2_moe": ("qwen2", lambda src: moe.fine_grained(src, segments=2, routed=4, shared=1, top_k=2, noise=0.05,
                                                        first_k_dense=1)),
    "qwen3_moe": ("qwen3", lambda src: moe.upcycle(src, num_experts=4, top_k=2, noise=0.05)),
}
ONE_MODEL = DENSE + list(MOE_BUILDS)
"""Every build of one model: each dense family (3 layers, tied as its conftest.FAMILY_CASES entry says), each
MoE class."""


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    # mistral and phi3 slide over 16 tokens (phi3 with fused projections), qwen2 has q/k/v biases, the Gemmas
    # sliding and global layers and soft-caps (Gemma 3 a rope of each kind): conftest.FAMILY_CASES.
    sources = {n: save_hf_model(root / n, n, seed=FAMILY_CASES[n].seed, layers=3, tie=FAMILY_CASES[n].tie)
               for n in DENSE}
    out = {n: build(load(str(src)), root / f"o_{n}", formats=["hf", "torch"], progress=False)
           for n, src in sources.items()}
    for name, (dense, recipe) in MOE_BUILDS.items():
        out[name] = build(recipe(load(str(sources[dense]))), root / f"o_{name}", formats=["hf", "torch"],
                          progress=False)
    out["calm"] = build(calm(anchor=load("tiny:llama?layers=2"), augment=load("tiny:qwen2?layers=2"), every=1),
                        root / "o_calm", progress=False)
    out["cogvlm"] = build(visual_expert(load("tiny:llama?layers=2"), vision_width=8), root / "o_vlm", progress=False)
    return out


@pytest.mark.parametrize("name", ONE_MODEL)
def test_static_cache_greedy_equals_transformers_generate(builds, name):
    module, model = runtime.load(builds[name])
    ids = token_ids(batch=2, seq=7, seed=3)
    ours = runtime.generate(module, model, ids, 14)  # 21 tokens: past mistral's window of 16
    ref = load_hf(builds[name]).generate(ids, max_new_tokens=14, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(ours, ref)
    assert torch.equal(ours, model.generate(ids, 14))  # the generated module's own (growing) cache


def _left_padded(B=3, T=9, seed=4):
    """A prompt batch whose rows hold 9, 5 and 7 real tokens after their padding (ids 0 there)."""
    ids = token_ids(batch=B, seq=T, seed=seed)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 4, 2)[:B]):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("name", ONE_MODEL)
def test_left_padded_batch_decodes_as_transformers_and_as_each_row_alone(builds, name):
    """A left-padded batch on the static cache: transformers' generate of the same padded batch (its own
    masks and positions), and each row decoded alone, give the same tokens. Mistral's window of 16 is
    passed (9 + 12 tokens), with padding inside the cache's slots."""
    module, model = runtime.load(builds[name])
    ids, mask = _left_padded()
    ours = runtime.generate(module, model, ids, 12, attention_mask=mask)
    hf = load_hf(builds[name])
    hf.generation_config.eos_token_id = None  # the runtime decodes max_new_tokens; transformers would stop
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, ref)
    # step by step, the real tokens' logits are those of transformers' one forward over the padded sequence
    prefill, decode, _ = runtime._steps(module, model, ids, 12, {}, mask)
    with torch.no_grad():
        steps = [prefill(ids)] + [decode(ours[:, t:t + 1]) for t in range(ids.size(1), ours.size(1) - 1)]
        full = hf(ours, attention_mask=torch.nn.functional.pad(mask, (0, 12), value=1)).logits[:, :-1]
    real = torch.nn.functional.pad(mask, (0, 11), value=1).bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=0, atol=1e-5)
    for row in range(ids.size(0)):
        real = ids[row:row + 1, mask[row] == 1]
        assert torch.equal(ours[row:row + 1, ids.size(1) - real.size(1):], runtime.generate(module, model, real, 12))


def test_left_padded_decode_step_traces_as_one_graph(builds):
    """The padded decode step reads no tensor on the host either (its mask and position counter are device
    tensors of fixed shape), so it can be captured as a CUDA graph."""
    ids, mask = _left_padded()
    for name in ("llama", "mistral"):
        traced, expected = traced_decode_step(*runtime.load(builds[name]), ids, attention_mask=mask)
        assert torch.equal(traced, expected), name


def test_bad_attention_mask_is_named(builds):
    from compose.errors import BuildError

    module, model = runtime.load(builds["llama"])
    ids, mask = _left_padded()
    for bad, words in ((mask.flip(1), "left-padded"), (mask[:, 1:], "shape"), (mask * 2, "only 0")):
        with pytest.raises(BuildError, match=words):
            runtime.generate(module, model, ids, 2, attention_mask=bad)
    calm_module, calm_model = runtime.load(builds["calm"])
    aug = token_ids(batch=3, seq=5, seed=8)
    with pytest.raises(BuildError, match="augment_attention_mask: rows must be left-padded"):
        runtime.generate(calm_module, calm_model, ids, 2, augment_ids=aug,
                         augment_attention_mask=torch.tensor([[1, 1, 1, 0, 0]] * 3))
    with pytest.raises(BuildError, match="without augment_ids"):
        runtime.generate(calm_module, calm_model, ids, 2, augment_attention_mask=torch.ones_like(aug))


def test_cogvlm_left_padded_batch_with_images_decodes_as_its_own_generate_and_each_row_alone(builds):
    """CogVLM on its static cache with a left-padded batch whose rows hold an image run: the generated module's
    own padded generate's tokens, and each row's alone (its rotary positions counted from the mask, an image
    run sharing one); the step traces as one graph."""
    module, model = _perturbed(builds["cogvlm"])
    ids, inputs = _vlm_prompt(B=3, start=6)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 4, 2)):
        mask[row, :pad], ids[row, :pad] = 0, 0
    ours = runtime.generate(module, model, ids, 8, attention_mask=mask, **inputs)
    assert torch.equal(ours, model.generate(ids, 8, inputs["token_type_ids"], inputs["images"], attention_mask=mask))
    for row in range(ids.size(0)):
        keep = mask[row] == 1
        want = runtime.generate(module, model, ids[row:row + 1, keep], 8,
                                token_type_ids=inputs["token_type_ids"][row:row + 1, keep],
                                images=inputs["images"][row:row + 1])
        assert torch.equal(ours[row:row + 1, -8:], want[:, -8:]), row
    traced, expected = traced_decode_step(module, model, ids, inputs, attention_mask=mask)
    assert torch.equal(traced, expected)


def test_calm_left_padded_batch_decodes_as_its_own_generate_and_each_row_alone(builds):
    """CALM on the static caches with a left-padded batch: reading the same tokens (both models and the
    cross-attention's keys masked), and reading a left-padded augmenting prompt of its own. The tokens are
    the generated module's own padded generate's, and each row's alone; the step traces as one graph."""
    module, model = _perturbed(builds["calm"])
    ids, mask = _left_padded()
    aug, aug_mask = _left_padded(T=6, seed=9)
    aug_mask[1, :3], aug[1, :3] = 0, 0
    for inputs, own in (({}, {}), (dict(augment_ids=aug, augment_attention_mask=aug_mask),
                                   dict(augment_ids=aug, augment_attention_mask=aug_mask))):
        ours = runtime.generate(module, model, ids, 8, attention_mask=mask, **inputs)
        assert torch.equal(ours, model.generate(ids, 8, attention_mask=mask, **own)), list(inputs)
        for row in range(ids.size(0)):
            real = ids[row:row + 1, mask[row] == 1]
            alone = {}
            if inputs:
                alone = dict(augment_ids=aug[row:row + 1, aug_mask[row] == 1])
            want = runtime.generate(module, model, real, 8, **alone)
            assert torch.equal(ours[row:row + 1, -8:], want[:, -8:]), (list(inputs), row)
        traced, expected = traced_decode_step(module, model, ids, inputs, attention_mask=mask)
        assert torch.equal(traced, expected)


def _perturbed(build_dir):
    """The build's module and model with every weight nudged: CALM's and CogVLM's new layers start as
    exact no-ops (zero o_proj), which would hide a cache that feeds them the wrong keys."""
    module, model = runtime.load(build_dir)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module, model


def _vlm_prompt(B=2, T=14, start=3, patches=5):
    ids = token_ids(batch=B, seq=T, seed=4)
    types = torch.zeros_like(ids)
    types[:, start:start + patches + 2] = 1  # begin-of-image, patches, end-of-image
    images = torch.randn(B, patches, 8, generator=torch.Generator().manual_seed(2))
    return ids, dict(token_type_ids=types, images=images)


def _composite_cases(builds):
    """(name, module, model, prompt ids, prompt inputs): CALM reading the same tokens, CALM reading its own
    augmenting prompt, CogVLM with an image in the prompt."""
    calm_mod, calm_model = _perturbed(builds["calm"])
    vlm_mod, vlm_model = _perturbed(builds["cogvlm"])
    ids = token_ids(batch=2, seq=6, seed=4)
    vlm_ids, vlm_inputs = _vlm_prompt()
    return [("calm", calm_mod, calm_model, ids, {}),
            ("calm augment_ids", calm_mod, calm_model, ids, dict(augment_ids=token_ids(batch=2, seq=9, seed=8))),
            ("cogvlm", vlm_mod, vlm_model, vlm_ids, vlm_inputs)]


def test_composite_builds_decode_on_static_caches(builds):
    """The runtime's preallocated caches give the tokens the generated modules' own growing caches give,
    and step by step the logits of one forward over the whole sequence."""
    for name, module, model, ids, inputs in _composite_cases(builds):
        ours = runtime.generate(module, model, ids, 7, **inputs)
        assert torch.equal(ours, model.generate(ids, 7, *inputs.values())), name
        full_inputs = dict(inputs)
        if "token_type_ids" in inputs:  # the new tokens are text
            full_inputs["token_type_ids"] = torch.nn.functional.pad(inputs["token_type_ids"], (0, 7))
        prefill, decode, _ = runtime._steps(module, model, ids, 7, inputs)
        with torch.no_grad():
            full = model(ours, **full_inputs)
            steps = [prefill(ids)] + [decode(ours[:, t:t + 1]) for t in range(ids.size(1), ours.size(1) - 1)]
        torch.testing.assert_close(torch.cat(steps, 1), full[:, :-1], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["llama", "mixtral"])
def test_warm_up_before_capture_leaves_no_trace(builds, name):
    """The eager half of the CUDA-graph path: warm-up runs of the decode step on the live caches, with
    the counters put back, change nothing that follows."""
    module, model = runtime.load(builds[name])
    cases = [(name, module, model, token_ids(batch=2, seq=5, seed=9), {})]
    if name == "llama":  # the composite kinds once, with their extra counters (CogVLM's next position)
        cases += _composite_cases(builds)
    for case, module, model, ids, inputs in cases:
        plain = runtime.generate(module, model, ids, 6, **inputs)
        prefill, decode, counters = runtime._steps(module, model, ids, 6, inputs)
        with torch.no_grad():
            token = prefill(ids)[:, -1:].argmax(-1)
            runtime._warm_up(decode, token, counters, runs=3)
            out = [ids, token]
            for _ in range(5):
                out.append(decode(out[-1])[:, -1:].argmax(-1))
        assert torch.equal(torch.cat(out, 1), plain), case


def test_decode_steps_trace_as_one_graph(builds):
    """A CUDA graph replays kernels only: a decode step that reads a tensor on the host (len of a cache,
    bool of a mask, .item()) cannot be captured. Dynamo with fullgraph=True refuses such reads too, so
    this checks every kind's decode step on CPU (MoE in bfloat16: the grouped_mm dispatch CUDA uses)."""
    module, model = runtime.load(builds["mixtral"], dtype="bfloat16")
    cases = [(n, *runtime.load(builds[n]), token_ids(batch=2, seq=5, seed=9), {}) for n in ("llama", "mistral")]
    cases += [("mixtral", module, model, token_ids(batch=2, seq=5, seed=9), {})] + _composite_cases(builds)
    for name, module, model, ids, inputs in cases:
        traced, expected = traced_decode_step(module, model, ids, inputs)
        assert torch.equal(traced, expected), name


def test_bad_generate_input_is_named(builds):
    from compose.errors import BuildError

    module, model = runtime.load(builds["llama"])
    with pytest.raises(BuildError, match="single build takes no images"):
        runtime.generate(module, model, token_ids(batch=1, seq=3), 2, images=torch.zeros(1, 1, 8))
    if not torch.cuda.is_available():
        with pytest.raises(BuildError, match="CUDA graphs need the model on a CUDA device"):
            runtime.generate(module, model, token_ids(batch=1, seq=3), 2, cuda_graph=True)


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
    alone = capsys.readouterr().out
    assert alone.startswith("<1>Once upon")
    # several prompts: a left-padded batch, each line what that prompt gives alone
    assert main(["generate", str(builds["llama"]), "--prompt", "Hi", "--max-new-tokens", "5"]) == 0
    short = capsys.readouterr().out
    assert main(["generate", str(builds["llama"]), "--prompt", "Once upon", "--prompt", "Hi",
                 "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == alone + short
    # CALM too (CogVLM as well; its prompts here would be text)
    lines = []
    for prompt in ("a", "bcd"):
        assert main(["generate", str(builds["calm"]), "--prompt", prompt, "--max-new-tokens", "4"]) == 0
        lines.append(capsys.readouterr().out)
    assert main(["generate", str(builds["calm"]), "--prompt", "a", "--prompt", "bcd", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == "".join(lines)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["llama", "mistral", "mixtral"])
def test_cuda_graph_decoding_equals_eager(builds, name):
    module, model = runtime.load(builds[name], device="cuda", dtype="bfloat16")
    ids = token_ids(batch=1, seq=8).cuda()
    eager = runtime.generate(module, model, ids, 16, cuda_graph=False)
    assert torch.equal(runtime.generate(module, model, ids, 16, cuda_graph=True), eager)
    ids, mask = (t.cuda() for t in _left_padded())  # a padded batch: its mask and position counter
    eager = runtime.generate(module, model, ids, 16, cuda_graph=False, attention_mask=mask)
    assert torch.equal(runtime.generate(module, model, ids, 16, cuda_graph=True, attention_mask=mask), eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decoding_equals_eager_for_calm_and_cogvlm(builds):
    for name, module, model, ids, inputs in _composite_cases(builds):
        model = model.cuda()
        ids, inputs = ids.cuda(), {k: v.cuda() for k, v in inputs.items()}
        eager = runtime.generate(module, model, ids, 12, cuda_graph=False, **inputs)
        assert torch.equal(runtime.generate(module, model, ids, 12, cuda_graph=True, **inputs), eager), name
        if name in ("calm", "cogvlm"):  # a padded batch: its mask and position counter
            mask = torch.ones_like(ids)
            mask[1, :3] = 0
            eager = runtime.generate(module, model, ids, 12, cuda_graph=False, attention_mask=mask, **inputs)
            assert torch.equal(runtime.generate(module, model, ids, 12, cuda_graph=True, attention_mask=mask,
                                                **inputs), eager), name
