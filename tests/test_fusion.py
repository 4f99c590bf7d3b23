"""The cse and fusion passes: what they decide (golden dumps in test_golden), that the checkpoint is the
same byte for byte with or without them, that the fused generated module computes what the unfused one
and transformers compute, and that shared expressions are read once."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compose import build, expand_blocks, load, moe
from compose.backends import hf
from compose.backends.shards import Entry
from compose.ir.weights import Load
from compose.pipeline import compile_graph
from compose.passes import DEFAULT_PIPELINE, FUSION
from conftest import load_hf, logits, token_ids
from test_codegen import import_module

SPECS = {
    "llama_pro": lambda m: expand_blocks(load(str(m["llama"])), groups=2),
    "qwen2": lambda m: load(str(m["qwen2"])),  # q/k/v biases, tied head
    "qwen3": lambda m: load(str(m["qwen3"])),  # q/k norms after the fused split
    "phi3": lambda m: load(str(m["phi3"])),  # the checkpoint's own qkv_proj and gate_up_proj
    "gemma2": lambda m: load(str(m["gemma2"])),
    "mixtral": lambda m: moe.upcycle(load(str(m["llama"])), num_experts=4, top_k=2, noise=0.01, seed=3),
    "qwen2_moe": lambda m: moe.fine_grained(load(str(m["llama"])), segments=2, routed=4, shared=1, top_k=2,
                                            noise=0.01, first_k_dense=1),  # dense layer + shared expert MLPs
}


@pytest.fixture(scope="module", params=sorted(SPECS))
def pair(request, hf_models, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    spec = SPECS[request.param](hf_models)
    fused = build(spec, root / "fused", formats=["hf", "torch"], progress=False)
    plain = build(spec, root / "plain", formats=["hf", "torch"], progress=False, fuse=False)
    return request.param, fused, plain


def test_checkpoint_is_byte_identical_without_the_fusion_passes(pair):
    _, fused, plain = pair
    weights = sorted(p.name for p in plain.iterdir() if p.suffix == ".safetensors" or p.name.endswith(".json")
                     and p.name != "compose.json")
    assert weights == sorted(p.name for p in fused.iterdir() if p.suffix == ".safetensors"
                             or p.name.endswith(".json") and p.name != "compose.json")
    for name in weights:
        assert (fused / name).read_bytes() == (plain / name).read_bytes(), name


def test_fused_module_computes_what_the_unfused_one_and_transformers_compute(pair):
    kind, fused, plain = pair
    f = import_module(fused / "modeling_compose.py").ComposeForCausalLM.from_pretrained(fused)
    p = import_module(plain / "modeling_compose.py").ComposeForCausalLM.from_pretrained(plain)
    names = {n for n, _ in f.named_parameters()}
    if kind != "phi3":  # the fusion passes fused what the checkpoint holds apart
        assert any(n.endswith("self_attn.qkv_proj.weight") for n in names)
        assert not any(n.endswith("self_attn.q_proj.weight") for n in names)
        assert not any(n.endswith("self_attn.qkv_proj.weight") for n, _ in p.named_parameters())
    ids = token_ids(seq=23)
    with torch.no_grad():
        a, b = f(ids), p(ids)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(a, logits(load_hf(fused), ids), rtol=0, atol=1e-5)
        assert torch.equal(f.generate(ids[:1, :5], 6), p.generate(ids[:1, :5], 6))


def test_unfused_state_is_a_checkpoint_transformers_loads(pair, tmp_path):
    """What was fused at load is split back under the checkpoint's names: saved, transformers reads it."""
    kind, fused, _ = pair
    mod = import_module(fused / "modeling_compose.py")
    model = mod.ComposeForCausalLM.from_pretrained(fused)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    state = mod.unfused_state(model) if hasattr(mod, "unfused_state") else model.state_dict()
    out = tmp_path / "trained"
    out.mkdir()
    for f in ("config.json",):
        (out / f).write_bytes((fused / f).read_bytes())
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors")
    ids = token_ids(seq=11)
    with torch.no_grad():
        torch.testing.assert_close(logits(load_hf(out), ids), model(ids), rtol=0, atol=1e-5)


def test_manifest_records_the_passes_that_ran(pair):
    import json

    _, fused, plain = pair
    assert json.loads((fused / "compose.json").read_text())["passes"] == list(DEFAULT_PIPELINE)
    ran = json.loads((plain / "compose.json").read_text())["passes"]
    assert ran == [p for p in DEFAULT_PIPELINE if p not in FUSION]


class CountingSources:
    """compose.sources.open_source, counting every tensor read (decoded or as bytes) per key."""

    def __init__(self):
        from compose.sources import open_source

        self.open = open_source
        self.reads: Counter[str] = Counter()

    def __call__(self, ref):
        src, reads = self.open(ref), self.reads

        class Counted:
            def tensor(self, key):
                reads[key] += 1
                return src.tensor(key)

            def span(self, key):
                reads[key] += 1
                return src.span(key)

            def __getattr__(self, name):
                return getattr(src, name)

        return Counted()


@pytest.mark.parametrize("workers", [1, 3])
def test_upcycling_reads_each_dense_ffn_once(hf_models, tmp_path, workers):
    g = compile_graph(moe.upcycle(load(str(hf_models["llama"])), num_experts=4, top_k=2))
    shared = {x.expr.key for x in g.state.shared}
    assert {f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(8) for p in ("gate", "up", "down")} <= shared
    sources = CountingSources()
    hf.write(g, tmp_path, sources, progress=False, workers=workers)
    assert set(sources.reads.values()) == {1}
    # Without the pass's record every expert reads its FFN again.
    sources = CountingSources()
    out = tmp_path / "without"
    out.mkdir()
    hf.write(g.replace(shared=()), out, sources, progress=False, workers=workers)
    assert sources.reads["model.layers.0.mlp.up_proj.weight"] == 4
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "model.safetensors").read_bytes()


def test_llama_pro_reads_each_copied_layer_once(hf_models, tmp_path):
    g = compile_graph(expand_blocks(load(str(hf_models["llama"])), groups=2))
    sources = CountingSources()
    hf.write(g, tmp_path, sources, progress=False)
    assert set(sources.reads.values()) == {1}
    assert sources.reads["model.layers.3.self_attn.q_proj.weight"] == 1  # written as layers 3 and 4


def test_far_apart_uses_are_read_again_instead_of_kept():
    """What is kept between uses fits the budget: uses many tensors apart (SOLAR's repeated layers) are
    read again rather than held."""
    a, b, c = (Load("src", k, (256, 256), "float32") for k in "abc")  # 256 kB each
    named = {"x0": a, "x1": b, "x2": c, "y0": a, "y1": b, "y2": c}
    entries = [Entry(n, (256, 256), "float32") for n in named]
    shared = {a, b, c}
    assert hf.kept_between_uses(entries, named, shared, budget=3 << 18) == shared
    assert hf.kept_between_uses(entries, named, shared, budget=2 << 18) == {a, b}
    near = {"x0": a, "y0": a, "x1": b, "y1": b, "x2": c, "y2": c}
    assert hf.kept_between_uses([Entry(n, (256, 256), "float32") for n in near], near, shared,
                                budget=1 << 18) == shared


def test_fusion_passes_leave_composites_and_generated_targets_unfused(hf_models):
    from compose import calm

    g = compile_graph(calm(anchor=load("tiny:llama?layers=2"), augment=load("tiny:qwen2?layers=2"), every=1, heads=4))
    assert not g.state.fusion.qkv and not g.state.fusion.gate_up
    gm = compile_graph(moe.upcycle(load(str(hf_models["gemma2"])), num_experts=2, top_k=1))
    assert gm.state.target.family == "compose_moe"
    assert gm.state.fusion.experts == "stacked" and not gm.state.fusion.qkv


def test_print_after_all_shows_each_pass(capsys):
    from compose.cli import main

    spec = Path(__file__).parents[1] / "specs" / "moe_upcycle.py"
    assert main(["inspect", str(spec), "--print-after-all"]) == 0
    text = capsys.readouterr().out
    for name in ("cse", "fuse-qkv", "fuse-gate-up", "stack-experts"):
        assert f"// ---- after {name} ----" in text
    after = text.split("// ---- after ")
    stage = {part.split(" ----")[0]: part for part in after[1:]}
    assert "state shared" not in stage["target"] and "state shared" in stage["cse"]
    assert "state fusion" not in stage["cse"]
    assert "state fusion = qkv\n" in stage["fuse-qkv"]
    assert "state fusion = qkv, gate_up\n" in stage["fuse-gate-up"]
    assert "state fusion = qkv, gate_up, experts stacked\n" in stage["stack-experts"]
