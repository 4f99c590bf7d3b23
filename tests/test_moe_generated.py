"""Mixtures of experts no transformers class holds (upcycled Gemma 2/3 and Phi-3, a Qwen3 DeepSeekMoE with
shared experts) are written as compose's generated code behind an auto_map. transformers loads them with
trust_remote_code, and at init they compute what the dense source computes in transformers' own class."""
from __future__ import annotations

import json

import pytest
import torch

from compose import build, load, moe
from conftest import load_hf, logits, read_tensors, save_hf_model, token_ids

GENERATED = ["gemma2", "gemma3", "phi3"]


def remote(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


def gate_up(t: dict, prefix: str) -> torch.Tensor:
    """A dense layer's gate rows then up rows (Phi-3 holds them so already)."""
    if prefix + "gate_up_proj.weight" in t:
        return t[prefix + "gate_up_proj.weight"]
    return torch.cat([t[prefix + "gate_proj.weight"], t[prefix + "up_proj.weight"]])


@pytest.mark.parametrize("family", GENERATED)
def test_upcycle_loads_with_remote_code_and_computes_the_dense_model(tmp_path, hf_models, family):
    src = hf_models[family]
    out = build(moe.upcycle(load(str(src)), num_experts=4, top_k=2), tmp_path / "out", progress=False)
    model = remote(out)
    assert type(model).__name__ == "ComposeHFForCausalLM"
    cfg = json.loads((out / "config.json").read_text())
    source_cfg = json.loads((src / "config.json").read_text())
    assert (cfg["model_type"], cfg["compose"]["family"]) == ("compose_moe", source_cfg["model_type"])
    assert (cfg["num_experts"], cfg["num_experts_per_tok"], cfg["mlp_only_layers"]) == (4, 2, [])
    ids = token_ids(seq=40)  # past the sources' 16-token windows
    torch.testing.assert_close(logits(model, ids), logits(load_hf(src), ids), rtol=0, atol=1e-5)
    got, want = read_tensors(out), read_tensors(src)
    for i in range(8):  # each expert a copy of the dense FFN, stacked as transformers 5 holds experts
        p = f"model.layers.{i}.mlp."
        assert got[p + "experts.gate_up_proj"].shape[0] == 4
        for e in range(4):
            assert torch.equal(got[p + "experts.gate_up_proj"][e], gate_up(want, p))
            assert torch.equal(got[p + "experts.down_proj"][e], want[p + "down_proj.weight"])
    assert not any(".experts.0." in k for k in got)


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_fine_grained_preserve_with_shared_experts_is_the_dense_function(tmp_path, hf_models, family):
    src = hf_models[family]
    spec = moe.fine_grained(load(str(src)), segments=4, routed=8, shared=2, top_k=2, preserve=True,
                            first_k_dense=1)
    out = build(spec, tmp_path / "out", progress=False)
    model = remote(out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"], cfg["mlp_only_layers"]) == (32, 128, [0])
    ids = token_ids(seq=40)
    torch.testing.assert_close(logits(model, ids), logits(load_hf(src), ids), rtol=0, atol=1e-5)
    got, want = read_tensors(out), read_tensors(src)
    p = "model.layers.3.mlp."
    assert torch.count_nonzero(got[p + "experts.down_proj"]) == 0  # the routed part adds exactly 0 at init
    for name, t in want.items():  # the shared expert is the dense FFN, under its own names
        if name.startswith(p):
            assert torch.equal(got[p + "shared_expert." + name[len(p):]], t)
    assert torch.equal(got["model.layers.0.mlp.down_proj.weight"], want["model.layers.0.mlp.down_proj.weight"])


def test_fine_grained_segments_of_a_fused_gate_up_are_rows_of_each_half(tmp_path, hf_models):
    """Phi-3's gate_up_proj holds gate's 128 rows then up's: segment j of 4 is rows 32j.. of each half."""
    src = hf_models["phi3"]
    out = build(moe.fine_grained(load(str(src)), segments=4, routed=4, shared=1, top_k=2), tmp_path / "out",
                progress=False)
    got, want = read_tensors(out), read_tensors(src)
    p = "model.layers.2.mlp."
    dense = want[p + "gate_up_proj.weight"]
    for e in range(4):
        rows = slice(32 * e, 32 * (e + 1))
        assert torch.equal(got[p + "experts.gate_up_proj"][e],
                           torch.cat([dense[:128][rows], dense[128:][rows]]))
        assert torch.equal(got[p + "experts.down_proj"][e], want[p + "down_proj.weight"][:, rows])
    assert torch.equal(got[p + "shared_expert.gate_up_proj.weight"], torch.cat([dense[:32], dense[128:160]]))
    assert torch.equal(got[p + "shared_expert.down_proj.weight"], want[p + "down_proj.weight"][:, :32])


def test_qwen3_deepseek_moe_with_shared_experts_is_generated_code(tmp_path, hf_models):
    """Qwen3-MoE has no shared expert: a Qwen3 DeepSeekMoE with shared experts is written as generated code
    (exact), not as Qwen3MoeForCausalLM (which would drop them)."""
    src = hf_models["qwen3"]
    spec = moe.fine_grained(load(str(src)), segments=2, routed=4, shared=1, top_k=2, preserve=True)
    out = build(spec, tmp_path / "out", progress=False)
    assert json.loads((out / "config.json").read_text())["compose"] == {"kind": "moe", "family": "qwen3"}
    ids = token_ids(seq=24)
    torch.testing.assert_close(logits(remote(out), ids), logits(load_hf(src), ids), rtol=0, atol=1e-5)


def test_from_experts_stacks_each_models_ffn(tmp_path, hf_models):
    src = hf_models["gemma2"]
    other = save_hf_model(tmp_path / "other", "gemma2", seed=21, tie=True)
    out = build(moe.from_experts(base=load(str(src)), experts=[load(str(src)), load(str(other))], top_k=1),
                tmp_path / "out", progress=False)
    got = read_tensors(out)
    for e, donor in enumerate((read_tensors(src), read_tensors(other))):
        for i in range(8):
            p = f"model.layers.{i}.mlp."
            assert torch.equal(got[p + "experts.gate_up_proj"][e], gate_up(donor, p))
            assert torch.equal(got[p + "experts.down_proj"][e], donor[p + "down_proj.weight"])
    remote(out)  # loads, every parameter from the checkpoint (transformers warns of none missing)


def test_generated_module_and_runtime_agree_with_transformers(tmp_path, hf_models):
    """The standalone module (`--format torch`) is the remote-code model, and the runtime's greedy decoding
    of the upcycled Gemma 3 gives the tokens transformers' own Gemma3ForCausalLM gives for the source."""
    from compose.backends import runtime

    src = hf_models["gemma3"]
    out = build(moe.upcycle(load(str(src)), num_experts=4, top_k=2), tmp_path / "out", formats=["hf", "torch"],
                progress=False)
    module, model = runtime.load(out)
    ids = token_ids(seq=20, seed=5)
    with torch.no_grad():
        assert torch.equal(model(ids), logits(remote(out), ids))
    ref = load_hf(src).generate(ids[:, :6], max_new_tokens=14, do_sample=False,
                                attention_mask=torch.ones_like(ids[:, :6]))
    assert torch.equal(runtime.generate(module, model, ids[:, :6], 14), ref)
    assert torch.equal(remote(out).generate(ids[:, :6], max_new_tokens=14), ref)


def test_what_the_generated_module_does_not_have_is_refused(hf_models, tmp_path):
    from compose.errors import BuildError

    with pytest.raises(BuildError, match="ComposeHFForCausalLM: layer 0 has router jitter 0.1, which the "
                                         "generated module does not implement"):
        build(moe.upcycle(load(str(hf_models["gemma2"])), num_experts=4, top_k=2, jitter=0.1), tmp_path / "o",
              progress=False)
    assert not (tmp_path / "o").exists()


def test_a_generated_moe_is_an_input_again(tmp_path, hf_models):
    """Any build's output is another spec's input: a Phi-3 MoE (fused dense layers and shared expert) built
    again unchanged is the same checkpoint; LLaMA-Pro on it keeps its function bit for bit; a merge of it
    with itself is the same model."""
    from compose import expand_blocks, merge

    spec = moe.fine_grained(load(str(hf_models["phi3"])), segments=2, routed=4, shared=1, top_k=2, noise=0.02,
                            first_k_dense=1)
    first = build(spec, tmp_path / "moe", progress=False)
    again = build(load(str(first)), tmp_path / "again", progress=False)
    assert json.loads((again / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    got, want = read_tensors(again), read_tensors(first)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    pro = build(expand_blocks(load(str(first)), groups=2), tmp_path / "pro", progress=False)
    mixed = build(merge.linear([load(str(first)), load(str(first))], weights=[0.5, 0.5]), tmp_path / "merged",
                  progress=False)
    ids = token_ids(seq=24)
    expected = logits(remote(first), ids)
    assert torch.equal(logits(remote(pro), ids), expected)
    torch.testing.assert_close(logits(remote(mixed), ids), expected, rtol=0, atol=1e-5)


def test_a_bad_compose_moe_config_is_named(tmp_path, hf_models):
    from compose.errors import SourceError
    from compose.pipeline import compile_graph

    out = build(moe.upcycle(load(str(hf_models["gemma2"])), num_experts=2, top_k=1), tmp_path / "moe",
                progress=False)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "compose": {"kind": "moe", "family": "compose_moe"}}))
    with pytest.raises(SourceError, match="config.json compose.family must name the dense family"):
        compile_graph(load(str(out)))
