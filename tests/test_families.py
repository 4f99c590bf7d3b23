"""Model families (compose.families): each one read from a checkpoint of transformers' own class and
written back as that class, checked with transformers itself; the registry covers them all; no module
outside families/ knows a family.

Adding a family: its module under families/ (collected from the folder) and one entry in conftest.FAMILY_CASES;
the family lists of the tests (round trips here, the tiny recipe check, codegen, LLaMA-Pro, SOLAR, CALM, CogVLM,
the runtime, GGUF) are computed from the registry and the family's properties.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from compose import build, families, layers, load, merge, stack
from compose.families import in_memory_name
from compose.sources import open_source
from conftest import FAMILY_CASES, FAMILY_TYPES, MOE, VOCAB, hf_config, load_hf, read_tensors, token_ids

ROOT = Path(__file__).parents[1]
PACKAGE = ("compose", "families", "lower", "ir", "passes", "backends", "codegen", "merges")
"""The folders installed as the compose package (pyproject's package-dir)."""

SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
"""The size of the configs written here by hand (the round trips' models are conftest.hf_config's)."""


def _source(folder: Path, name: str) -> Path:
    """A 3-layer model of transformers' own class for family `name` (conftest.FAMILY_CASES: its small model
    and what the round trip adds), every weight perturbed, saved as it saves."""
    import transformers

    config = hf_config(name, layers=3, **FAMILY_CASES[name].round_trip)
    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_((0.1 if n.endswith("norm.weight") else 0.02) * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """family -> (source folder, compose's build of it unchanged)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for n in FAMILY_TYPES:
        src = _source(root / n, n)
        out[n] = (src, build(load(str(src)), root / f"{n}_out", progress=False))
    return out


def test_every_family_has_a_test_entry():
    """Every family with a transformers class (collected from families/) has its entry in conftest's table;
    compose_moe's own outputs round-trip in test_moe_generated."""
    assert set(FAMILY_CASES) == set(FAMILY_TYPES)
    assert set(FAMILY_TYPES.values()) == {t for t in families.SOURCES if not families.get(t).generated}


@pytest.mark.parametrize("family", sorted(FAMILY_TYPES))
def test_round_trip_through_transformers(round_trips, family):
    """Read as the family, written back as its class: transformers loads the same class with the same
    config (every field it reads), the same tensor names, and computes the same logits."""
    src, out = round_trips[family]
    a, b = load_hf(src), load_hf(out)
    assert type(b) is type(a)
    fields = {k for k in a.config.to_dict() if k not in ("transformers_version", "_name_or_path", "architectures",
                                                          "dtype", "torch_dtype", "output_hidden_states")}
    want, got = a.config.to_dict(), b.config.to_dict()
    # Equal in what the model computes: head_dim None means hidden / heads (compose writes the number), and
    # max_window_layers means nothing without sliding layers (layer_types says which layers slide).
    want["head_dim"] = want.get("head_dim") or want["hidden_size"] // want["num_attention_heads"]
    if not want.get("use_sliding_window"):
        fields.discard("max_window_layers")
    assert {k: got.get(k) for k in fields} == {k: want[k] for k in fields}
    assert set(read_tensors(out)) == set(read_tensors(src))
    ids = token_ids(batch=2, seq=40)
    with torch.no_grad():
        assert torch.equal(b(ids).logits, a(ids).logits)


def test_qwen3_moe_sparse_step_keeps_dense_layers_in_between(tmp_path):
    """decoder_sparse_step=2: only every second layer is MoE (mlp_only_layers adds a dense one). compose
    writes the same layers as decoder_sparse_step 1 and mlp_only_layers, which transformers reads alike."""
    import transformers

    config = hf_config("qwen3_moe", layers=5, decoder_sparse_step=2, mlp_only_layers=[3])
    torch.manual_seed(8)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "src")
    out = build(load(str(tmp_path / "src")), tmp_path / "out", progress=False)
    a, b = load_hf(tmp_path / "src"), load_hf(out)
    moe_layers = [i for i, layer in enumerate(b.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe_layers == [i for i, layer in enumerate(a.model.layers) if hasattr(layer.mlp, "experts")] == [1]
    ids = token_ids(batch=2, seq=40)
    with torch.no_grad():
        assert torch.equal(b(ids).logits, a(ids).logits)


@pytest.mark.parametrize("family", MOE)
def test_in_memory_names_are_transformers(round_trips, family):
    """Checkpoint names map to the names transformers 5 gives the loaded (stacked) parameters."""
    _, out = round_trips[family]
    names = {in_memory_name(k) for k in read_tensors(out)}
    assert names == {n for n, _ in load_hf(out).named_parameters()}


@pytest.mark.parametrize("family", families.TINY)
def test_tiny_recipe_is_the_transformers_layout(family, tmp_path):
    """tiny:<family>'s config builds transformers' class, whose checkpoint (as save_pretrained writes it:
    per-expert names for an MoE) holds exactly the tensors the source lists."""
    from transformers import AutoConfig, AutoModelForCausalLM

    src = open_source(f"tiny:{family}?layers=2")
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(src.config)))
    assert type(model).__name__ == families.get(families.TINY[family]).architecture
    model.save_pretrained(tmp_path)
    want = {n: tuple(t.shape) for n, t in read_tensors(tmp_path).items()}
    assert {k: src.meta(k)[0] for k in src.keys()} == want


def test_rope_and_sliding_fields_are_typed():
    fam = families.get("qwen2")
    c = {"model_type": "qwen2", **SMALL, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2,
         "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
         "rope_theta": 1e6, "initializer_range": 0.02, "auto_map": {"AutoModel": "evil.Model"}}
    cfg = fam.arch_config(c, "here", "float32")
    assert (cfg.rope.type, cfg.rope.theta, cfg.rope.factor, cfg.rope.original_max_positions) == ("yarn", 1e6, 4.0, 64)
    assert [fam.window(c, i, "here") for i in range(3)] == [None, None, 8]
    # Uninterpreted fields are carried; file fields (auto_map: code a source names) are not.
    assert cfg.carried() == {"initializer_range": 0.02}


@pytest.mark.parametrize("bad,match", [
    ({"rope_parameters": {"rope_type": "su"}}, "rope_type 'su' is not supported"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "needs low_freq_factor, high_freq_factor"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "beta": 1}}, "has beta, which compose does not know"),
    ({"rope_parameters": {"rope_type": "linear", "factor": float("nan")}}, "factor: must be a finite number"),
    ({"num_attention_heads": "4"}, "num_attention_heads must be an integer"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
])
def test_bad_config_fields_are_named(bad, match):
    from compose.errors import SourceError

    with pytest.raises(SourceError, match=match):
        families.get("llama").arch_config({"model_type": "llama", **SMALL, **bad}, "cfg", "float32")


# -- no family knowledge outside families/ ---------------------------------------------------------------

def _package_files():
    for folder in PACKAGE:
        if folder == "families":
            continue
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".j2"))


LLAMA_CPP_NAMES = {"backends/gguf_vocab.py": {'"llama"', '"qwen2"'}}
"""Strings outside families/ that spell a model_type but are llama.cpp's names for something else: its
tokenizer model `llama` (SentencePiece-style BPE) and its pre-tokenizer `qwen2` (a split regex), which
gguf_vocab decides from tokenizer.json, not from the model's family (a merge may carry any tokenizer)."""


def test_no_transformers_class_or_model_type_outside_families():
    """Family knowledge lives in families/ only: no other module of the package names a family's
    transformers classes (every class the family's transformers module exports) or its model_type."""
    import importlib

    import transformers

    names = set()
    for t in (t for t in families.SOURCES if not families.get(t).generated):
        arch = families.get(t).architecture  # its package (gemma3_text's classes live in models.gemma3)
        module = importlib.import_module(getattr(transformers, arch).__module__.rpartition(".")[0])
        names |= {n for n in getattr(module, "__all__", dir(module)) if n[0].isupper()}
        names.add(families.get(t).architecture)
    assert {"LlamaForCausalLM", "Qwen2MoeConfig", "MixtralModel"} <= names
    class_re = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names), key=len, reverse=True)) + r")\b")
    type_re = re.compile(r"""["'](""" + "|".join(map(re.escape, families.SOURCES)) + r""")["']""")
    found, allowed = [], set()
    for path in _package_files():
        text, rel = path.read_text(), str(path.relative_to(ROOT))
        for m in class_re.finditer(text):
            found.append(f"{rel}: {m.group(0)}")
        for m in type_re.finditer(text):
            if m.group(0) in LLAMA_CPP_NAMES.get(rel, ()):
                allowed.add((rel, m.group(0)))
            else:
                found.append(f"{rel}: {m.group(0)}")
    assert not found, found
    # each allowance is still used: one that outlives its string would hide a real model_type later
    assert allowed == {(f, n) for f, ns in LLAMA_CPP_NAMES.items() for n in ns}
    assert transformers  # the check above is only as good as transformers' own list


LAYERS = {"errors": set(), "ir": {"ir", "merges"}, "merges": {"merges"}, "families": {"ir", "families"},
          "lower": {"ir", "families", "merges", "lower"}, "passes": {"ir", "families", "passes"},
          "codegen": {"ir", "families", "codegen"}, "backends": {"ir", "families", "codegen", "backends"}}
"""What each part of the package may import (besides compose.errors), down the pipeline: nothing below the
front door (compose/) imports it."""


def test_imports_run_down_the_pipeline():
    bad = []
    for folder in PACKAGE:
        if folder == "compose":
            continue
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    # `from compose import families` imports compose.families
                    mods = ([f"compose.{a.name}" for a in node.names] if node.module == "compose"
                            else [node.module or ""])
                else:
                    mods = []
                for mod in mods:
                    parts = mod.split(".")
                    if parts[0] != "compose":
                        continue
                    part = parts[1] if len(parts) > 1 else "compose"
                    if part != "errors" and part not in LAYERS[folder]:
                        bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, bad


@pytest.mark.parametrize("spec,match", [
    # Where the math does not allow mixing families: one error naming both.
    (lambda: stack(layers(load("tiny:qwen3?layers=2"), 0, 2), layers(load("tiny:gemma3?layers=2"), 0, 2)),
     r"model.slices\[1\]: family gemma3_text does not match slices\[0\]'s qwen3"),
    (lambda: merge.linear([load("tiny:gemma2?layers=2"), load("tiny:gemma3?layers=2")], weights=[0.5, 0.5]),
     "a gemma3_text model cannot merge with .*'s gemma2"),
])
def test_what_a_family_cannot_do_yet_is_refused_by_name(spec, match):
    from compose.errors import SpecError
    from compose.pipeline import compile_graph

    with pytest.raises(SpecError, match=match):
        compile_graph(spec())
