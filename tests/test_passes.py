"""Each pass on its own, the verifier's error messages, and the PassManager's error context."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from compose import depth_upscale, expand_blocks, layers, load, stack
from compose.errors import IRError
from compose.ir import Load, Zeros
from compose.ir.evaluate import Evaluator
from compose.ir.verify import verify
from compose.ir.weights import Concat, Merge, Noise, Scale, Slice
from compose.pipeline import lower_spec as lower
from compose.passes import PassManager
from compose.passes.cost import Cost
from compose.passes.dead_weights import DeadWeights
from compose.passes.preservation import Preservation
from compose.passes.target import Target
from compose.passes.trainable import Trainable
from compose.sources import clear_cache


@pytest.fixture(autouse=True)
def fresh_sources():
    clear_cache()


def test_verifier_names_the_node_with_a_bad_shape():
    g = lower(load("tiny:llama?layers=2"))
    name, block = g.blocks()[1]
    bad = block.with_weights(**{"mlp.up_proj.weight": Zeros((7, 64), "float32")})
    with pytest.raises(IRError, match=r"node layers.1: weight mlp.up_proj.weight has shape \[7, 64\], expected \[128, 64\]"):
        verify(g.replace({name: bad}))


def test_verifier_checks_heads_against_kv_heads():
    g = lower(load("tiny:llama?layers=2"))
    name, block = g.blocks()[0]
    bad = dataclasses.replace(block, attn=dataclasses.replace(block.attn, kv_heads=3))
    with pytest.raises(IRError, match="node layers.0: 4 attention heads are not a multiple of 3 kv heads"):
        verify(g.replace({name: bad}))


def test_pass_manager_names_the_failing_pass_and_its_predecessors():
    g = lower(load("tiny:llama?layers=2"))
    name, block = g.blocks()[0]
    g = g.replace({name: block.with_weights(**{"self_attn.q_proj.weight": Zeros((1,), "float32")})})
    with pytest.raises(IRError, match=r"pass verify \(after dead-weights, trainable\): node layers.0"):
        PassManager(["dead-weights", "trainable", "verify"]).run(g)


def test_dead_weights_removes_unused_layers():
    g = lower(layers(load("tiny:llama"), 2, 5))
    assert len(g.dead()) == 5
    g2 = DeadWeights().run(g)
    assert g2.dead() == [] and len(g2.blocks()) == 3
    assert g2.state.dropped == tuple(("tiny:llama", i) for i in (0, 1, 5, 6, 7))
    loads = {e.key for _, op in g2.items() for e in op.params().values() if isinstance(e, Load)}
    assert not any(k.startswith(("model.layers.0.", "model.layers.5.")) for k in loads)


def test_preservation_needs_both_output_projections_zero():
    g = lower(expand_blocks(load("tiny:llama?layers=2"), groups=1))
    name, block = g.blocks()[2]
    assert Preservation().run(g).op(name).identity
    src = g.blocks()[1][1].params()["mlp.down_proj.weight"]
    half = block.with_weights(**{"mlp.down_proj.weight": src})
    assert not Preservation().run(g.replace({name: half})).op(name).identity
    assert not any(b.identity for _, b in Preservation().run(lower(depth_upscale(load("tiny:llama"), drop=2))).blocks())


def test_trainable_only_new_blocks_after_expansion_everything_otherwise():
    pro = Trainable().run(lower(expand_blocks(load("tiny:llama?layers=4"), groups=2)))
    assert [n for n, op in pro.items() if op.trainable] == ["layers.2", "layers.5"]
    solar = Trainable().run(lower(depth_upscale(load("tiny:llama?layers=4"), drop=1)))
    assert all(op.trainable for _, op in solar.items())
    mixed = Trainable().run(lower(stack(layers(expand_blocks(load("tiny:llama?layers=4"), groups=1), 0, 5),
                                        layers(load("tiny:llama?layers=4"), 3, 4))))
    assert [n for n, op in mixed.items() if op.trainable] == ["layers.4"]


def test_cost_counts_a_tied_head_once():
    from transformers import AutoModelForCausalLM

    from compose.backends.hf import hf_config
    from transformers import Qwen2Config

    g = Cost().run(Trainable().run(Target().run(lower(load("tiny:qwen2")))))
    ref = AutoModelForCausalLM.from_config(Qwen2Config(**hf_config(g)))
    assert g.state.cost.params == ref.num_parameters()
    matmul = sum(p.numel() for n, p in ref.named_parameters() if p.dim() == 2 and "embed" not in n)
    assert g.state.cost.flops_per_token == 2 * (matmul + ref.lm_head.weight.numel())


def test_evaluator_ops_and_cse():
    reads = []
    a = Load("s", "a", (4, 6), "float32")
    data = torch.arange(24, dtype=torch.float32).reshape(4, 6)

    def read(e):
        reads.append(e.key)
        return data

    s = Slice(a, 1, 2, 5)
    roots = [Concat((s, s), 0), Scale(s, 2.0), Noise(a, 0.5, seed=3), Noise(a, 0.5, seed=3),
             Merge("linear", (a, Zeros((4, 6), "float32")), params=(("weight", [3.0, 1.0]),))]
    ev = Evaluator(roots, read)
    out = [ev(r) for r in roots]
    assert torch.equal(out[0], torch.cat([data[:, 2:5]] * 2))
    assert torch.equal(out[1], data[:, 2:5] * 2)
    assert torch.equal(out[2], out[3]) and not torch.equal(out[2], data)
    assert torch.equal(out[4], data * 0.75)
    # `s` and the repeated Noise are computed once and kept for their later uses; a Load is never kept,
    # so `a` is read by the Concat (for `s`), the first Noise and the Merge.
    assert reads == ["a", "a", "a"]


def test_target_pass_records_the_class_and_shows_the_qwen2_moe_rewrites():
    """The always-on shared expert goes behind a zero gate with its down projection doubled, as expressions
    in the graph (so `compose inspect --after target` shows them); a dense graph is its own family's class."""
    from compose import moe
    from compose.ir import print_graph

    g = lower(moe.fine_grained(load("tiny:llama?layers=2"), segments=2, routed=4, shared=1, top_k=2, preserve=True))
    before = print_graph(g)
    g = Target().run(g)
    after = print_graph(g)
    assert g.state.target.architecture == "Qwen2MoeForCausalLM"
    assert "shared_expert_gate" not in before and "mlp.shared_expert_gate.weight <- zeros[1, 64]" in after
    assert "mlp.shared_expert.down_proj.weight <- scale(%0:model.layers.0.mlp.down_proj.weight, 2.0)" in after
    assert Target().run(lower(load("tiny:mistral"))).state.target.architecture == "MistralForCausalLM"
