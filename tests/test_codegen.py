"""The torch backend: generated modeling_compose.py computes what transformers computes, exports with
torch.export (dynamic batch and sequence) and traces with torch.fx, and reads like hand-written code."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from compose import build, expand_blocks, families, load
from compose.backends import torch as torch_backend
from compose.codegen import render_modeling
from compose.errors import BuildError
from compose.ir import Graph
from compose.pipeline import lower_spec as lower
from conftest import DENSE, FAMILY_CASES, FAMILY_TYPES, load_hf, logits, save_hf_model, token_ids

FAMILIES = DENSE
# Each family's small model, tied and sharded as its conftest.FAMILY_CASES entry says: llama is sharded
# (exercises the index), mistral has a window of 16 (sequences of 40 cross it), qwen2 has q/k/v biases and ties
# its head to the embedding, qwen3 normalises q and k per head and has a head_dim that is not hidden / heads,
# phi3 fuses q/k/v and gate/up, gemma2 and gemma3 have 1 + w norms before and after each sublayer, soft-caps,
# a scaled embedding and sliding and global layers (gemma3 with a rope of each kind).


def graph_of(folder: Path) -> Graph:
    return lower(load(str(folder)))


def import_module(path: Path):
    """Import a generated file under a unique name (registered: dataclasses look their module up)."""
    name = f"modeling_compose_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """family -> (folder, imported module): a tiny transformers model with modeling_compose.py beside it."""
    root = tmp_path_factory.mktemp("codegen")
    out = {}
    for family in FAMILIES:
        case = FAMILY_CASES[family]
        folder = save_hf_model(root / family, family, seed=0, layers=3, shard=case.shard, tie=case.tie)
        assert torch_backend.write(graph_of(folder), folder) == ["modeling_compose.py"]
        out[family] = (folder, import_module(folder / "modeling_compose.py"))
    return out


def compose_model(generated, family: str, dtype=None):
    folder, module = generated[family]
    return module.ComposeForCausalLM.from_pretrained(folder, dtype=dtype)


# -- numbers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(generated, family):
    folder, _ = generated[family]
    ours, ref = compose_model(generated, family), load_hf(folder)
    ids = token_ids(batch=2, seq=40)
    with torch.no_grad():
        got = ours(ids)
    want = logits(ref, ids)
    assert got.shape == (2, 40, 512)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_load_matches_transformers(generated, family):
    from transformers import AutoModelForCausalLM

    folder, _ = generated[family]
    ours = compose_model(generated, family, dtype="bfloat16")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits)


def test_gemma_embedding_scale_is_rounded_to_the_model_dtype(tmp_path):
    """Width 72: sqrt(72) is not a bfloat16 number. transformers rounds it to bf16 before the product, so
    must the generated module, bit for bit."""
    folder = save_hf_model(tmp_path / "src", "gemma2", layers=1, hidden=72, tie=True)
    assert torch_backend.write(graph_of(folder), folder) == ["modeling_compose.py"]
    module = import_module(folder / "modeling_compose.py")
    ours = module.ComposeForCausalLM.from_pretrained(folder, dtype="bfloat16")
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    ids = token_ids()
    with torch.no_grad():
        want = ref.model.embed_tokens(ids)
        assert torch.equal(module.embed(ours.model.embed_tokens, ids), want)
        assert not torch.equal(ours.model.embed_tokens(ids) * 72 ** 0.5, want)  # unrounded, it differs


def test_parameter_names_are_transformers_names(generated):
    for family in FAMILIES:
        folder, _ = generated[family]
        ours = dict(compose_model(generated, family).named_parameters())
        ref = dict(load_hf(folder).named_parameters())  # named_parameters lists a tied matrix once
        assert set(ours) == set(ref), family
        assert ("lm_head.weight" in ours) == (not FAMILY_CASES[family].tie)


def test_sliding_window_is_exercised(generated, monkeypatch):
    """With the window widened past the sequence, positions >= 16 change: the mask is doing work."""
    folder, module = generated["mistral"]
    ids = token_ids(seq=40)
    want = logits(load_hf(folder), ids)
    full = module.sliding_window_mask
    monkeypatch.setattr(module, "sliding_window_mask", lambda q, k, window: full(q, k, 10**6))
    with torch.no_grad():
        got = compose_model(generated, "mistral")(ids)
    assert (got[:, :16] - want[:, :16]).abs().max().item() <= 1e-5
    assert (got[:, 16:] - want[:, 16:]).abs().max().item() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_torch_export_with_dynamic_batch_and_sequence(generated, family):
    model = compose_model(generated, family)
    batch, seq = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("seq", min=1, max=256)
    program = torch.export.export(model, (token_ids(),), dynamic_shapes=({0: batch, 1: seq},))
    exported = program.module()
    for shape in [(2, 40), (3, 17), (1, 1)]:
        ids = torch.randint(0, 512, shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.testing.assert_close(exported(ids), model(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_fx_symbolic_trace(generated, family):
    model = compose_model(generated, family)
    # The cache-free graph without padding (fx traces every argument it is not told is None as a tensor).
    traced = torch.fx.symbolic_trace(model, concrete_args={"cache": None, "attention_mask": None, "position_ids": None})
    ids = token_ids(seq=33)
    with torch.no_grad():
        torch.testing.assert_close(traced(ids), model(ids), rtol=0, atol=1e-6)


def test_build_with_torch_format(tmp_path, generated):
    """compose build --format torch: the module lands next to the built checkpoint and loads it."""
    folder, _ = generated["llama"]
    out = build(expand_blocks(load(str(folder)), groups=3), tmp_path / "out", formats=("hf", "torch"),
                progress=False)
    module = import_module(out / "modeling_compose.py")
    assert module.Config.n_layer == 6
    ids = token_ids()
    with torch.no_grad():
        got = module.ComposeForCausalLM.from_pretrained(out)(ids)
    assert (got - logits(load_hf(out), ids)).abs().max().item() <= 1e-5


# -- the source a person reads ---------------------------------------------------------------------------

def source(generated, family: str) -> str:
    folder, _ = generated[family]
    return (folder / "modeling_compose.py").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_source_is_flat_standalone_python(generated, family):
    src = source(generated, family)
    model_type = FAMILY_TYPES[family]
    assert src.startswith(f"# modeling_compose.py: generated by compose from a {model_type} graph with 3 decoder layers.")
    tree = ast.parse(src)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "json", "math", "dataclasses", "pathlib", "torch", "safetensors"}
    classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    offset = families.get(model_type).features.norm == "offset_rms"  # Gemma's 1 + w
    norms = ["RMSNorm", "OffsetRMSNorm"] if offset else ["RMSNorm"]
    assert classes == ["Config", *norms, "KVCache", "Attention", "MLP", "Block", "ComposeModel", "ComposeForCausalLM"]
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            assert ast.get_docstring(node), f"{node.name} has no docstring"
        if isinstance(node, ast.FunctionDef) and node.name == "forward":
            # The compiler chose the path: forward passes have no branches on config flags.
            assert not any(isinstance(n, (ast.If, ast.IfExp)) for n in ast.walk(node)), node.name
    assert "# (B, n_head, T, hd)" in src and "# (B, T, vocab_size)" in src


def test_llama_source_has_only_its_path(generated):
    src = source(generated, "llama")
    assert "bias=True" not in src
    assert "sliding_window" not in src and "window" not in src
    assert "is_causal=True" in src
    assert "self.lm_head = nn.Linear(self.config.n_embd, self.config.vocab_size, bias=False)" in src
    # The values of the source config, baked in as defaults.
    assert '''
    vocab_size: int = 512
    n_layer: int = 3
    n_embd: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 128
    """Width of the MLP's hidden layer."""
    n_head: int = 4
    n_kv_head: int = 2
''' in src
    assert '''
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (..., size)
        return self.down_proj(h)  # (..., n_embd)
''' in src


def test_mistral_source_has_the_window(generated):
    src = source(generated, "mistral")
    assert "sliding_window: int = 16" in src
    assert "return (j <= i) & (i - j < window)" in src
    assert "attn_mask=mask" in src


def test_qwen2_source_has_qkv_biases_and_a_tied_head(generated):
    src = source(generated, "qwen2")
    for proj in "qkv":
        assert f"self.{proj}_proj = nn.Linear(config.n_embd, " in src
    assert src.count("bias=True") == 3
    assert "self.o_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)" in src
    assert "self.lm_head" not in src
    assert "return F.linear(x, self.model.embed_tokens.weight)  # (B, T, vocab_size)" in src
    assert "sliding_window" not in src


def test_no_repeat_when_every_head_has_its_own_kv(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    src = render_modeling(graph_of(tmp_path))
    assert "repeat_interleave" not in src and "Multi-head causal self-attention" in src


# -- errors ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def phi4_mini(tmp_path_factory):
    """Phi-4-mini's attention at tiny size: 3/4 of each head rotates, longrope's short and long factors
    (one per rotating pair) switch past original_max_position_embeddings=32, a tied head."""
    from transformers import Phi3Config, Phi3ForCausalLM

    factors = [1.0 + 0.3 * i for i in range(6)]  # head_dim 16: 12 rotating dimensions, 6 pairs
    cfg = Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, original_max_position_embeddings=32,
                     partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
                     rope_scaling={"rope_type": "longrope", "short_factor": factors,
                                   "long_factor": [4 * f for f in factors]})
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("phi4_mini") / "src"
    Phi3ForCausalLM(cfg).save_pretrained(folder)
    out = build(load(str(folder)), folder.parent / "out", formats=("hf", "torch"), progress=False)
    return folder, out


@pytest.mark.parametrize("seq", [20, 40])  # within the original context, then past it (the long factors)
def test_partial_rotary_and_longrope_match_transformers(phi4_mini, seq):
    src, out = phi4_mini
    ref, built = load_hf(src), load_hf(out)
    assert built.config.rope_parameters["partial_rotary_factor"] == 0.75
    ids = token_ids(seq=seq)
    want = logits(ref, ids)
    assert torch.equal(logits(built, ids), want)
    module = import_module(out / "modeling_compose.py")
    assert module.Config.rotary_dim == 12
    with torch.no_grad():
        got = module.ComposeForCausalLM.from_pretrained(out)(ids)
    assert (got - want).abs().max().item() <= 1e-5


def test_partial_rotary_is_exercised(phi4_mini, monkeypatch):
    """Rotating whole heads instead gives other logits: the test above would catch a dropped factor."""
    _, out = phi4_mini
    module = import_module(out / "modeling_compose.py")
    model = module.ComposeForCausalLM.from_pretrained(out)
    ids = token_ids(seq=20)
    with torch.no_grad():
        want = model(ids)
        monkeypatch.setattr(module, "apply_rope", lambda x, cos, sin: x)
        assert (model(ids) - want).abs().max().item() > 1e-3


def test_unsupported_rope_is_a_clear_error(generated):
    g = graph_of(generated["llama"][0])
    rope = dataclasses.replace(g.config.rope, partial_rotary_factor=0.4375)  # 7 of head_dim 16
    with pytest.raises(BuildError, match="need an even number of rotating dimensions, got 7"):
        render_modeling(g.with_config(rope=rope))


def test_unsupported_activation_is_a_clear_error(generated):
    g = graph_of(generated["llama"][0])
    with pytest.raises(BuildError, match="no activation 'relu'"):
        render_modeling(g.with_config(act="relu"))


def test_blocks_that_disagree_are_named(generated):
    g = graph_of(generated["llama"][0])
    block = g.op("layers.1")
    odd = dataclasses.replace(block, attn=dataclasses.replace(block.attn, o_bias=True))
    with pytest.raises(BuildError, match="node layers.1: o_bias=True differs from layers.0"):
        render_modeling(g.replace({"layers.1": odd}))


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_decoding_matches_full_forward(generated, family):
    """Prefill then one token at a time through the cache gives the logits of one full forward (Mistral's
    sequence is longer than its window of 16), and greedy generate agrees with re-running the prefix."""
    model = compose_model(generated, family)
    ids = token_ids(seq=24)
    with torch.no_grad():
        full = model(ids)
        cache = type(model).__module__ and sys.modules[type(model).__module__].KVCache()
        steps = [model(ids[:, :10], cache)] + [model(ids[:, t:t + 1], cache) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    out = model.generate(ids[:, :5], max_new_tokens=6)
    with torch.no_grad():
        for t in range(5, 11):
            assert torch.equal(out[:, t], model(out[:, :t])[:, -1].argmax(-1))
