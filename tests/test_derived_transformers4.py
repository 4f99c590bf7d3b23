"""Derived families' outputs as transformers 4.x reads them: a LLaMA-Pro build of a checkpoint that
transformers 5 saved loads in 4.x (tests/test_transformers4.py installs it once), computes 5.x's logits of
the same folder, and 4.x's own logits of the source, bit for bit (the new blocks add exactly 0 there too)."""
from __future__ import annotations

import json

import pytest
import torch
from test_transformers4 import run_transformers4, transformers4  # noqa: F401 (the fixture)

import derived_zoo as zoo
from compose.pipeline import build

# Text classes of several kinds (OLMo 2's q/k norms, Granite's multipliers, SmolLM3's NoPE layers, GLM-4.5's
# MoE after a dense layer, Cohere 2's sliding/global pattern) and Gemma 3's image-text-to-text class, which
# 4.x's AutoModelForCausalLM also maps.
TYPES = ["olmo2", "granite", "smollm3", "glm4_moe", "cohere2", "gemma3"]


def test_derived_outputs_load_in_transformers4(transformers4, tmp_path):  # noqa: F811
    cases, built = {}, {}
    for t in TYPES:
        src = zoo.save(tmp_path / f"{t}-src", t)
        spec = tmp_path / f"{t}.json"
        spec.write_text(json.dumps({"model": {"op": "expand_blocks", "model": {"op": "load", "ref": str(src)},
                                              "groups": 2}}))
        built[t] = build(str(spec), tmp_path / f"{t}-out", progress=False)
        ids = zoo.text_inputs(t)["input_ids"].tolist()
        cases[t] = {"folder": str(built[t]), "ids": ids}
        cases[f"{t}-source"] = {"folder": str(src), "ids": ids}
    result = run_transformers4(transformers4, cases, tmp_path)
    assert not result["errors"], result["errors"]
    for t in TYPES:
        mine = zoo.model_class(t).from_pretrained(built[t], dtype=torch.float32).eval()
        with torch.no_grad():
            five = mine(input_ids=torch.tensor(cases[t]["ids"])).logits
        four = result["logits"][t]
        assert torch.equal(four, result["logits"][f"{t}-source"]), t
        torch.testing.assert_close(four, five, rtol=0, atol=1e-5, msg=t)
