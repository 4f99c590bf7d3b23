"""Bad MoE input: one line naming the field, exit code 2, nothing written."""
from __future__ import annotations

import pytest

from test_errors import assert_clean_failure, write

CASES = {
    "different_widths": (
        "model = moe.from_experts(base=load('tiny:llama'), experts=[load('tiny:llama?seed=1'),"
        " load('tiny:llama?seed=2&intermediate=96')])",
        ["model.experts[1]", "different widths", "96", "128"]),
    "top_k_over_experts": (
        "model = moe.upcycle(load('tiny:llama'), num_experts=4, top_k=5)",
        ["model.top_k", "5", "4 routed experts"]),
    "segments_not_dividing": (
        "model = moe.fine_grained(load('tiny:llama'), segments=3, routed=6, top_k=2)",
        ["model.segments", "3 does not divide", "128"]),
    "preserve_shared_not_dividing": (
        "model = moe.fine_grained(load('tiny:llama'), segments=4, routed=8, shared=3, top_k=2, preserve=True)",
        ["model.shared", "3 does not divide"]),
    "expert_with_other_depth": (
        "model = moe.from_experts(base=load('tiny:llama'), experts=[load('tiny:llama?layers=4'), load('tiny:llama')])",
        ["model.experts[0]", "4 layers", "8"]),
    "layer_out_of_range": (
        "model = moe.upcycle(load('tiny:llama'), num_experts=4, layers=[0, 9])",
        ["model.layers", "[9]", "8 layers"]),
    "prompts_per_expert": (
        "model = moe.from_experts(base=load('tiny:llama'), experts=[load('tiny:llama?seed=1'), load('tiny:llama?seed=2')],"
        " router=moe.hidden_router(prompts=[['a']]))",
        ["model.router.prompts", "1 prompt lists for 2 experts"]),
    "upcycle_an_moe": (
        "model = moe.upcycle(moe.upcycle(load('tiny:llama'), num_experts=2), num_experts=2)",
        ["model.model", "already a mixture of experts"]),
    "composite_expert": (
        "from compose import visual_expert\n"
        "model = moe.from_experts(base=load('tiny:llama'), experts=[visual_expert(load('tiny:llama?seed=1'), "
        "vision_width=8), load('tiny:llama?seed=2')])",
        ["model.experts[0]", "visual experts cannot be composed further"]),
    "no_class_holds_it": (  # refused by the target pass, naming each candidate's reason, before any write
        "from compose import layers, stack\n"
        "model = stack(layers(moe.upcycle(load('tiny:llama'), num_experts=2), 0, 4),"
        " layers(moe.upcycle(load('tiny:llama'), num_experts=4), 4, 8))",
        ["pass target", "no transformers class holds this model exactly", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
         "MoE layers differ"]),
    "zero_experts": (
        "model = moe.upcycle(load('tiny:llama'), num_experts=0)",
        ["moe.upcycle.num_experts", "greater than 0"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_moe_input(tmp_path, case):
    body, needles = CASES[case]
    spec = write(tmp_path / "s.py", "from compose import load, moe\n" + body + "\n")
    assert_clean_failure(tmp_path, spec, *needles)
