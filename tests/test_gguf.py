"""`--format gguf` (backends/gguf.py), checked with llama.cpp's own reader and, where it is built, llama.cpp.

Every file is read back with `gguf.GGUFReader` (the reader llama.cpp publishes): the metadata against the
build's config.json, every tensor against the build's safetensors, exactly, through llama.cpp's layout
(tensor names from gguf's own HF name map, q/k rows in the interleaved pairs llama.cpp's NORM rope rotates,
Gemma's 1 + w norms, DeepSeek-MoE's always-on shared expert). With llama-cpp-python importable from the
cache bench/llama_cpp_check.py fills, llama.cpp's logits (f32 KV cache) are compared with transformers'.
"""
from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from conftest import VOCAB, save_hf_model

from compose import families, load, merge, moe
from compose.errors import BuildError
from compose.pipeline import build

LLAMA_CPP_CACHE = Path.home() / ".cache" / "compose-test" / "llama-cpp-python-0.3.36"


TINY = {n: t for n, t in families.TINY.items() if families.get(t).gguf_arch is not None}
"""Every family with a tiny recipe and a llama.cpp architecture: its tiny model is built as it is."""
TINY_QUERY = {"llama": "layers=3", "qwen2": "layers=3", "mistral": "layers=2&window=0", "gemma3": "layers=6"}
"""Options other than layers=2: a Mistral without a window (llama.cpp's llama has none), a Gemma 3 that reaches
its first global layer. (phi3's tiny model has fused q/k/v and gate/up and an untied head: Phi-4's layout.)"""


def _builds():
    qwen2 = "tiny:qwen2?layers=3"
    return {
        **{n: load(f"tiny:{n}?{TINY_QUERY.get(n, 'layers=2')}") for n in TINY},
        "llama_bf16": load("tiny:llama?layers=2&seed=3", dtype="bfloat16"),
        "llama_f16": load("tiny:llama?layers=2&seed=4", dtype="float16"),
        "mixtral": moe.upcycle(load("tiny:llama?layers=2"), num_experts=4, top_k=2, noise=0.02,
                               router=moe.random(seed=1, std=0.5)),
        # compose's DeepSeekMoE (a Qwen2-MoE with a zero shared gate and a dense first layer) -> deepseek
        "deepseek": moe.fine_grained(load(qwen2), segments=4, routed=8, shared=2, top_k=2, first_k_dense=1,
                                     norm_topk_prob=False, router=moe.random(seed=2, std=0.5)),
        "deepseek_unshared": moe.fine_grained(load("tiny:llama?layers=3"), segments=2, routed=4, top_k=2,
                                              first_k_dense=1, norm_topk_prob=False,
                                              router=moe.random(seed=3, std=0.5)),
        # a learned shared-expert gate -> qwen2moe
        "qwen2moe": moe.from_experts(base=load("tiny:qwen2?layers=2"),
                                     experts=[load(f"tiny:qwen2?layers=2&seed={s}") for s in (1, 2, 3)],
                                     shared_expert=load("tiny:qwen2?layers=2&seed=4"), shared_gate=True,
                                     top_k=2, norm_topk_prob=False, router=moe.random(seed=4, std=0.5)),
        # transformers' own Gemma checkpoints (tests/conftest.py): soft-caps that bend the logits, a sliding
        # pattern of their own, Gemma 3's linearly scaled global rope next to its local theta
        "gemma2_hf": lambda root: load(str(save_hf_model(root / "gemma2_src", "gemma2", layers=4, tie=True,
                                                         query_pre_attn_scalar=32,
                                                         layer_types=["sliding_attention", "full_attention"] * 2)
                                          )),
        "gemma3_hf": lambda root: load(str(save_hf_model(root / "gemma3_src", "gemma3", layers=4,
                                                         query_pre_attn_scalar=32))),
    }


ARCH = {**{n: families.get(t).gguf_arch for n, t in TINY.items()},
        "llama_bf16": "llama", "llama_f16": "llama", "mixtral": "llama", "deepseek": "deepseek",
        "deepseek_unshared": "deepseek", "qwen2moe": "qwen2moe", "gemma2_hf": "gemma2", "gemma3_hf": "gemma3"}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """name -> the build folder (hf + gguf), each built once per session."""
    root = tmp_path_factory.mktemp("gguf")
    specs, done = _builds(), {}

    def get(name: str) -> Path:
        if name not in done:
            spec = specs[name](root) if callable(specs[name]) else specs[name]
            done[name] = build(spec, root / name, formats=["hf", "gguf"], progress=False, workers=1)
        return done[name]

    return get


def _reader(folder: Path):
    return gguf.GGUFReader(folder / "model.gguf")


def _field(r, key):
    return r.fields[key].contents()


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _as_torch(t) -> torch.Tensor:
    """A GGUFReader tensor as torch, in PyTorch's dimension order (the reader's numpy view is row-major)."""
    data = np.array(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        return torch.from_numpy(data.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(data.copy())


def _interleaved(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face's q/k rows, whose rope pairs dimension j with j + head_dim/2, reordered so pairs sit
    side by side (2j, 2j+1), as llama.cpp's NORM rope rotates them."""
    hd = w.shape[0] // heads
    h = w.reshape(heads, hd, *w.shape[1:])
    out = torch.empty_like(h)
    out[:, 0::2], out[:, 1::2] = h[:, : hd // 2], h[:, hd // 2:]
    return out.reshape(w.shape)


def _expected(folder: Path, arch: str) -> dict[str, torch.Tensor]:
    """GGUF name -> tensor, from the build's safetensors through gguf's own HF name map and llama.cpp's
    layouts, derived from config.json alone."""
    cfg = json.loads((folder / "config.json").read_text())
    sd = _safetensors(folder)
    n = cfg["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), n)
    gemma = arch.startswith("gemma")
    experts: dict[str, dict[int, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        m = re.fullmatch(r"(.*)\.experts\.(\d+)\.(\w+)\.weight", name)
        if m:
            experts.setdefault(f"{m[1]}.experts.{m[3]}.weight", {})[int(m[2])] = t
            continue
        if name.endswith("shared_expert_gate.weight") and arch == "deepseek":
            assert not t.any(), "deepseek is chosen for compose's zero gate only"
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, f"gguf maps no {arch} tensor to {name}"
        if arch in ("llama", "deepseek") and re.search(r"\.(q|k)_proj\.", name):
            heads = cfg["num_attention_heads"] if ".q_proj." in name else cfg["num_key_value_heads"]
            t = _interleaved(t, heads)
        if gemma and name.endswith("norm.weight"):
            t = t.float() + 1
        if name.endswith("shared_expert_gate.weight"):
            t = t.reshape(-1)
        out[new] = t
    for name, by_id in experts.items():
        new = tmap.get_name(name, try_suffixes=(".weight",))
        assert new is not None, f"gguf maps no {arch} tensor to {name}"
        out[new] = torch.stack([by_id[e] for e in range(len(by_id))])
    if arch == "deepseek":  # always-on shared experts: 1/2 of the down projection (sigmoid(0)), padded
        width = cfg["moe_intermediate_size"] * _field_of(folder, "deepseek.expert_shared_count")
        for i in range(cfg["mlp_only_layers"][-1] + 1 if cfg["mlp_only_layers"] else 0, n):
            for proj, dim in (("gate", 0), ("up", 0), ("down", 1)):
                key = f"blk.{i}.ffn_{proj}_shexp.weight"
                t = out.get(key)
                if t is None:
                    t = torch.zeros((0, cfg["hidden_size"]) if dim == 0 else (cfg["hidden_size"], 0), dtype=sd[
                        "model.embed_tokens.weight"].dtype)
                if proj == "down":
                    t = t * 0.5
                pad = list(t.shape)
                pad[dim] = width - t.shape[dim]
                out[key] = torch.cat([t, torch.zeros(pad, dtype=t.dtype)], dim)
    if "output.weight" not in out and arch == "qwen2moe":  # its loader requires the head
        out["output.weight"] = out["token_embd.weight"]
    return out


def _field_of(folder: Path, key: str):
    return _field(_reader(folder), key)


@pytest.mark.parametrize("name", list(ARCH))
def test_metadata_matches_config(built, name):
    folder = built(name)
    cfg = json.loads((folder / "config.json").read_text())
    r = _reader(folder)
    arch = _field(r, "general.architecture")
    assert arch == ARCH[name]

    def f(key):
        return _field(r, f"{arch}.{key}")

    assert f("block_count") == cfg["num_hidden_layers"]
    assert f("context_length") == cfg["max_position_embeddings"]
    assert f("embedding_length") == cfg["hidden_size"]
    assert f("attention.head_count") == cfg["num_attention_heads"]
    assert f("attention.head_count_kv") == cfg["num_key_value_heads"]
    assert f("attention.key_length") == f("attention.value_length") == cfg["head_dim"]
    assert f("attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"], rel=1e-6)
    assert f("vocab_size") == cfg["vocab_size"]
    rope = cfg["rope_parameters"]
    assert f("rope.freq_base") == pytest.approx(rope.get("full_attention", rope)["rope_theta"], rel=1e-7)
    if "sliding_attention" in rope:
        assert f("rope.freq_base_swa") == pytest.approx(rope["sliding_attention"]["rope_theta"], rel=1e-7)
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        assert f("expert_count") == experts
        assert f("expert_used_count") == cfg["num_experts_per_tok"]
        if arch != "llama":
            assert f("expert_feed_forward_length") == cfg["moe_intermediate_size"]
        else:
            assert f("feed_forward_length") == cfg["intermediate_size"]
    else:
        assert f("feed_forward_length") == cfg["intermediate_size"]
        assert f"{arch}.expert_count" not in r.fields
    if arch == "deepseek":
        dense = cfg["mlp_only_layers"]
        assert dense == list(range(len(dense))) and f("leading_dense_block_count") == len(dense)
        assert f("feed_forward_length") == cfg["intermediate_size"]
        assert f("expert_shared_count") == max(1, math.ceil(cfg["shared_expert_intermediate_size"]
                                                            / cfg["moe_intermediate_size"]))
    if arch == "qwen2moe":
        assert f("expert_shared_feed_forward_length") == cfg["shared_expert_intermediate_size"]
    if arch.startswith("gemma"):
        assert f("attention.sliding_window") == cfg["sliding_window"]
        assert list(f("attention.sliding_window_pattern")) == [t == "sliding_attention" for t in cfg["layer_types"]]
        assert f("final_logit_softcapping") == pytest.approx(cfg.get("final_logit_softcapping") or 0.0)
    if arch == "gemma2":
        assert f("attn_logit_softcapping") == pytest.approx(cfg["attn_logit_softcapping"])
    file_type = {"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                 "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[cfg["dtype"]]
    assert _field(r, "general.file_type") == file_type
    assert _field(r, "tokenizer.ggml.model") == "none"  # the tiny models have no tokenizer


@pytest.mark.parametrize("name", list(ARCH))
def test_every_tensor_matches_safetensors(built, name):
    folder = built(name)
    r = _reader(folder)
    expected = _expected(folder, ARCH[name])
    got = {t.name: t for t in r.tensors}
    assert sorted(got) == sorted(expected)
    dtype = json.loads((folder / "config.json").read_text())["dtype"]
    kind = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    for key, want in expected.items():
        t = got[key]
        small = len(want.shape) <= 1 or key.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight"))
        assert t.tensor_type.name == ("F32" if small else kind), key
        have = _as_torch(t)
        assert tuple(have.shape) == tuple(want.shape), key
        want = want.to(have.dtype)
        assert torch.equal(have, want), f"{name}: {key} differs"


def test_deepseek_shared_expert_is_the_transformers_function(built):
    """The deepseek file's always-on shared expert adds exactly what transformers' gated one adds."""
    from transformers import AutoModelForCausalLM

    folder = built("deepseek")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    r = {t.name: _as_torch(t) for t in _reader(folder).tensors}
    mlp = model.model.layers[1].mlp
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = torch.sigmoid(mlp.shared_expert_gate(x)) * mlp.shared_expert(x)
    gate, up, down = (r[f"blk.1.ffn_{p}_shexp.weight"] for p in ("gate", "up", "down"))
    have = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-7)


def test_tokenizer_json_is_written(tmp_path):
    """A source with a byte-level BPE tokenizer.json: its tokens, types and merges, and the special ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20 + ["hello world"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    src = tmp_path / "src"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    fast.save_pretrained(src)
    out = build(load(str(src)), tmp_path / "out", formats=["hf", "gguf"], progress=False)
    r = _reader(out)
    assert _field(r, "tokenizer.ggml.model") == "gpt2"
    tokens = _field(r, "tokenizer.ggml.tokens")
    vocab = AutoTokenizer.from_pretrained(src).get_vocab()
    assert len(tokens) == 320
    assert all(tokens[i] == t for t, i in vocab.items())
    assert tokens[len(vocab):] == [f"[PAD{i}]" for i in range(len(vocab), 320)]
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[vocab["<s>"]] == gguf.TokenType.CONTROL and types[vocab["the"]] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    merges = json.loads((src / "tokenizer.json").read_text())["model"]["merges"]
    want = [m if isinstance(m, str) else " ".join(m) for m in merges]
    assert list(_field(r, "tokenizer.ggml.merges")) == want
    assert _field(r, "tokenizer.ggml.bos_token_id") == vocab["<s>"]
    assert _field(r, "tokenizer.ggml.eos_token_id") == vocab["</s>"]


# -- refusals: by name, before anything is written -------------------------------------------------------

def _phi3_longrope(root: Path):
    return load(str(save_hf_model(root / "src", "phi3", layers=1, max_position_embeddings=128,
                                  original_max_position_embeddings=32, sliding_window=None,
                                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                   "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})))


REFUSED = {
    "sliding window": (lambda root: load("tiny:mistral?layers=2&window=16"), "sliding window of 16"),
    "renormalised qwen2moe": (lambda root: moe.fine_grained(load("tiny:qwen2?layers=2"), segments=2, routed=4,
                                                            shared=1, norm_topk_prob=True), "norm_topk_prob"),
    "dense after moe": (lambda root: moe.fine_grained(load("tiny:llama?layers=4"), segments=2, routed=4, shared=1,
                                                      every=2, norm_topk_prob=False),
                        "layer 2 is dense after an MoE layer"),
    "qwen3moe dense layer": (lambda root: moe.upcycle(load("tiny:qwen3?layers=3"), num_experts=4, first_k_dense=1),
                             "layer 0 is dense"),
    "qwen3moe unnormalised": (lambda root: moe.upcycle(load("tiny:qwen3?layers=2"), num_experts=4,
                                                       norm_topk_prob=False), "norm_topk_prob False"),
    "generated class": (lambda root: moe.upcycle(load("tiny:gemma2?layers=2"), num_experts=4),
                        "compose's generated class"),
    # llama.cpp's phi3 ignores sliding_window (Phi-3-mini-4k's 2047); its longrope picks the factors by the
    # context it is given, not by the sequence's length as transformers does
    "phi3 window": (lambda root: load(str(save_hf_model(root / "src", "phi3", layers=1, sliding_window=16))),
                    "sliding window of 16"),
    "phi3 longrope": (_phi3_longrope, "rope type 'longrope'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_by_name_before_writing(tmp_path, case):
    spec, words = REFUSED[case]
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="--format gguf") as e:
        build(spec(tmp_path), out, formats=["hf", "gguf"], progress=False)
    assert words in str(e.value)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] in ([], ["src"])


def test_composite_refused(tmp_path):
    from compose import calm

    spec = calm(anchor=load("tiny:llama?layers=2"), augment=load("tiny:llama?layers=2&seed=1"), every=1)
    with pytest.raises(BuildError, match="composite"):
        build(spec, tmp_path / "out", formats=["hf", "gguf"], progress=False)
    assert not (tmp_path / "out").exists()


def test_cli_builds_gguf(tmp_path):
    from compose.cli import main

    spec = tmp_path / "spec.yaml"
    spec.write_text("model: {op: load, ref: 'tiny:llama?layers=1'}\n")
    assert main(["build", str(spec), "-o", str(tmp_path / "out"), "--format", "hf,gguf", "--no-progress"]) == 0
    record = json.loads((tmp_path / "out" / "compose.json").read_text())
    assert "model.gguf" in record["files"] and "model.gguf" in record["sha256"]


# -- llama.cpp itself ------------------------------------------------------------------------------------

def _llama_cpp():
    if not (LLAMA_CPP_CACHE / "llama_cpp").is_dir():
        pytest.skip(f"llama-cpp-python is not built in {LLAMA_CPP_CACHE} (run bench/llama_cpp_check.py)")
    if str(LLAMA_CPP_CACHE) not in sys.path:
        sys.path.append(str(LLAMA_CPP_CACHE))  # after the venv: its numpy and jinja2 win
    try:
        import llama_cpp
    except (ImportError, OSError) as e:  # a build for another Python or machine
        pytest.skip(f"llama_cpp from {LLAMA_CPP_CACHE} does not import: {e}")
    return llama_cpp


def llama_cpp_logits(llama_cpp, path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` (f32 KV cache, one thread)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(64, len(ids)), n_batch=len(ids), logits_all=True,
                          n_threads=1, verbose=False, type_k=0, type_v=0)  # 0: GGML_TYPE_F32
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


@pytest.mark.parametrize("name", list(ARCH))
def test_llama_cpp_logits_match_transformers(built, name):
    llama_cpp = _llama_cpp()
    from transformers import AutoModelForCausalLM

    folder = built(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits[0].float().numpy()
    have = llama_cpp_logits(llama_cpp, folder / "model.gguf", ids[0].tolist())
    assert np.isfinite(have).all()
    scale = max(1.0, float(np.abs(want).max()))
    # float32: the same function up to summation order (about 2e-6 here); llama.cpp's CPU GELU (Gemma) reads an
    # fp16 table (about 1.5e-3); half builds: llama.cpp rounds the activations to the weights' dtype too.
    tol = 2e-2 if json.loads((folder / "config.json").read_text())["dtype"] != "float32" else (
        5e-3 if ARCH[name].startswith("gemma") else 1e-4)
    diff = float(np.abs(have - want).max())
    print(f"{name}: max |llama.cpp - transformers| = {diff:.2e} (max |logit| {scale:.2f})")
    assert diff <= tol * scale
    assert (have.argmax(-1) == want.argmax(-1)).mean() >= 0.9


YARN = {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 4.0, "original_max_position_embeddings": 32}
YARN_CASES = {
    "qwen2": ("qwen2", YARN),
    "llama": ("llama", YARN),
    # an attention factor of its own (not 0.1 ln(factor) + 1): rope.scaling.attn_factor carries the ratio
    "llama_attention_factor": ("llama", {**YARN, "attention_factor": 1.3}),
}


@pytest.mark.parametrize("case", list(YARN_CASES))
def test_yarn_rope_in_llama_cpp_is_transformers(tmp_path, case):
    """YaRN (Qwen2.5's long context): llama.cpp's logits over 80 positions, most of them past the original 32,
    equal transformers' (f32). Without the YaRN keys (a plain rope) llama.cpp's differ, so the check can fail."""
    llama_cpp = _llama_cpp()
    from conftest import load_hf

    family, rope = YARN_CASES[case]
    src = _sharp_attention(save_hf_model(tmp_path / "src", family, layers=2, perturb_all=True, rope_parameters=rope,
                                         max_position_embeddings=128))
    out = build(load(str(src)), tmp_path / "out", formats=["hf", "gguf"], progress=False)
    r = _reader(out)
    assert _field(r, f"{ARCH[family]}.rope.scaling.type") == "yarn"
    assert _field(r, f"{ARCH[family]}.rope.scaling.original_context_length") == 32
    ids = torch.randint(0, VOCAB, (1, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = load_hf(src)(ids).logits[0].numpy()
    have = llama_cpp_logits(llama_cpp, out / "model.gguf", ids[0].tolist())
    scale = max(1.0, float(np.abs(want).max()))
    diff = float(np.abs(have - want).max())
    print(f"yarn {case}: max |llama.cpp - transformers| = {diff:.2e} (max |logit| {scale:.2f})")
    assert diff <= 1e-4 * scale
    plain = with_metadata(out / "model.gguf", {f"{ARCH[family]}.rope.scaling.type": "none"}, tmp_path / "plain.gguf")
    assert float(np.abs(llama_cpp_logits(llama_cpp, plain, ids[0].tolist()) - want).max()) > 1e-2 * scale
    key = f"{ARCH[family]}.rope.scaling.attn_factor"
    assert (key in r.fields) == ("attention_factor" in rope)
    if key in r.fields:  # ...and without it, llama.cpp's cos/sin scale is the default one
        bare = with_metadata(out / "model.gguf", {}, tmp_path / "bare.gguf", remove=(key,))
        assert float(np.abs(llama_cpp_logits(llama_cpp, bare, ids[0].tolist()) - want).max()) > 1e-2 * scale


def _sharp_attention(folder: Path) -> Path:
    """The model at `folder` with q and k scaled up, so that attention is peaked and its logits depend on the
    rotary angles and the cos/sin scale (at init's small weights every score is about 0: nearly uniform)."""
    from safetensors.torch import load_file, save_file

    t = load_file(folder / "model.safetensors")
    for k in t:
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            t[k] = t[k] * 6
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("rope, match", [
    ({**YARN, "beta_fast": 16.0}, "beta_fast 16.0"),
    ({**YARN, "truncate": False}, "truncate false"),
    ({**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}, "mscale"),
    ({"rope_type": "dynamic", "rope_theta": 20000.0, "factor": 2.0}, "rope type 'dynamic'"),
])
def test_ropes_llama_cpp_cannot_be_told_are_refused(tmp_path, rope, match):
    src = save_hf_model(tmp_path / "src", "llama", layers=1, rope_parameters=rope, max_position_embeddings=128)
    with pytest.raises(BuildError, match=match):
        build(load(str(src)), tmp_path / "out", formats=["hf", "gguf"], progress=False)
    assert not (tmp_path / "out").exists()


def test_llama3_rope_factors_are_transformers_frequencies(tmp_path):
    """Llama 3.1's rope as llama.cpp reads it: rope_freqs divides each default frequency down to the one
    transformers' own rotary embedding uses."""
    from conftest import load_hf

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    src = save_hf_model(tmp_path / "src", "llama", layers=1, num_attention_heads=2, num_key_value_heads=1,
                        rope_parameters=rope)
    out = build(load(str(src)), tmp_path / "out", formats=["hf", "gguf"], progress=False)
    r = _reader(out)
    factors = _as_torch(next(t for t in r.tensors if t.name == "rope_freqs.weight"))
    inv_freq = load_hf(src).model.rotary_emb.inv_freq.double()
    d = 2 * inv_freq.numel()
    default = 1.0 / (500000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    torch.testing.assert_close(factors.double(), default / inv_freq, rtol=1e-5, atol=0)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the ramp are present


def test_sentencepiece_style_tokenizer_json_is_written_as_llama(tmp_path):
    """A byte-fallback BPE tokenizer.json (Llama 2's and Gemma's kind): llama.cpp's `llama` tokenizer with
    byte tokens typed BYTE, read through gguf's own LlamaHfVocab."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"]
                                  + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    src = tmp_path / "src"
    cfg = LlamaConfig(vocab_size=340, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    fast.save_pretrained(src)
    out = build(load(str(src)), tmp_path / "out", formats=["hf", "gguf"], progress=False)
    r = _reader(out)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    tokens, types = _field(r, "tokenizer.ggml.tokens"), _field(r, "tokenizer.ggml.token_type")
    vocab = AutoTokenizer.from_pretrained(src).get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items()) and len(tokens) == 340
    assert types[vocab["<0x0A>"]] == gguf.TokenType.BYTE and types[vocab["</s>"]] == gguf.TokenType.CONTROL
    assert len(_field(r, "tokenizer.ggml.scores")) == 340


# -- pre-tokenizers: the split llama.cpp computes, named for the regex tokenizer.json holds ------------------

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
TEXT = ("I'll pay 1234567 dollars, don't you think?\n\n  Hello   World!!\t3.14159 na\u00efve caf\u00e9 "
        "\u6771\u4eac HELLO'S 2024-12-03\r\n  end  ")
"""Digits in runs longer than three, contractions in both cases, runs of spaces, newlines and tabs, and
non-ASCII letters: where the pre-tokenizers differ from one another and from llama.cpp's `default`."""


def _byte_level_source(folder: Path, pre, ignore_merges: bool = False, extra: str = "", seed: int = 0) -> Path:
    """A tiny Llama with a byte-level BPE tokenizer.json trained (seeded corpus, plus `extra`) behind the
    `pre` split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT, "the quick brown fox, 12 345 678!", "hello world 999", extra] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=416, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _split(regex: str):
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "llama-bpe": lambda: (_split(LLAMA3_SPLIT), True),  # Llama 3's tokenizer.json ignores merges too
    "qwen2": lambda: (_split(QWEN2_SPLIT), False),
    "gpt-2": lambda: (__import__("tokenizers").pre_tokenizers.ByteLevel(add_prefix_space=False), False),
}


@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_pre_tokenizer_is_named_and_llama_cpp_tokenizes_as_transformers(tmp_path, pre):
    """`tokenizer.ggml.pre` names the split the tokenizer.json holds; where llama.cpp is built, its ids for
    TEXT equal transformers' (with `default`, the name written before, they did not)."""
    from transformers import AutoTokenizer

    split, ignore_merges = PRE_TOKENIZERS[pre]()
    src = _byte_level_source(tmp_path / "src", split, ignore_merges)
    out = build(load(str(src)), tmp_path / "out", formats=["hf", "gguf"], progress=False)
    r = _reader(out)
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == pre
    want = AutoTokenizer.from_pretrained(src).encode(TEXT, add_special_tokens=False)
    assert llama_cpp_tokens(_llama_cpp(), out / "model.gguf", TEXT) == want


def llama_cpp_tokens(llama_cpp, path: Path, text: str) -> list[int]:
    """llama.cpp's ids for `text` (no BOS, special tokens as text), from the GGUF's vocabulary alone."""
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    finally:
        llm.close()


def with_pre(path: Path, pre: str, out: Path) -> Path:
    """A copy of the GGUF at `path` naming the pre-tokenizer `pre`, through gguf's own metadata tool."""
    return with_metadata(path, {"tokenizer.ggml.pre": pre}, out)


def with_metadata(path: Path, strings: dict[str, str], out: Path, remove: tuple[str, ...] = ()) -> Path:
    """A copy of the GGUF at `path` with these string keys set and `remove` left out, through gguf's own
    metadata tool."""
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(path)
    copy_with_new_metadata(reader, gguf.GGUFWriter(out, _field(reader, "general.architecture")),
                           {k: MetadataDetails(gguf.GGUFValueType.STRING, v) for k, v in strings.items()}, remove)
    return out


def test_default_pre_tokenizer_splits_otherwise(tmp_path):
    """The test above can fail: llama.cpp's `default` split tokenizes TEXT differently from a Llama 3
    tokenizer (so a file named `default`, as compose wrote before, decoded other ids)."""
    from transformers import AutoTokenizer

    split, ignore_merges = PRE_TOKENIZERS["llama-bpe"]()
    src = _byte_level_source(tmp_path / "src", split, ignore_merges)
    out = build(load(str(src)), tmp_path / "out", formats=["hf", "gguf"], progress=False)
    llama_cpp = _llama_cpp()
    assert _field(_reader(out), "tokenizer.ggml.pre") == "llama-bpe"
    have = llama_cpp_tokens(llama_cpp, with_pre(out / "model.gguf", "default", tmp_path / "default.gguf"), TEXT)
    assert have != AutoTokenizer.from_pretrained(src).encode(TEXT, add_special_tokens=False)


@pytest.mark.parametrize("case", ["unknown split", "prefix space", "whitespace split"])
def test_pre_tokenizer_llama_cpp_does_not_compute_is_refused_before_writing(tmp_path, case):
    from tokenizers import pre_tokenizers

    split = {"unknown split": lambda: _split(r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"),
             "prefix space": lambda: pre_tokenizers.ByteLevel(add_prefix_space=True),
             "whitespace split": lambda: pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                                   pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                           use_regex=False)])}[case]()
    src = _byte_level_source(tmp_path / "src", split)
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="tokenizer.json") as e:
        build(load(str(src)), out, formats=["hf", "gguf"], progress=False)
    assert {"unknown split": "regex llama.cpp does not compute", "prefix space": "prefix space",
            "whitespace split": "WhitespaceSplit + ByteLevel"}[case] in str(e.value)
    assert not out.exists()


def _unreachable_word_source(folder: Path, split, ignore_merges: bool) -> Path:
    """A byte-level BPE whose vocabulary holds the word "abc" that its merges never make (only a+b): with
    ignore_merges it is one token, without it "ab" + "c"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<s>", "</s>", *alphabet, "ab", "abc"])}
    tok = Tokenizer(models.BPE(vocab, [("a", "b")], ignore_merges=ignore_merges))
    tok.pre_tokenizer = split
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    assert fast.convert_ids_to_tokens(fast.encode("abc", add_special_tokens=False)) == (
        ["abc"] if ignore_merges else ["ab", "c"])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=1)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_ignore_merges_must_be_the_pre_tokenizers(tmp_path, pre):
    """llama.cpp's llama-bpe ignores merges for words in the vocabulary and its qwen2 applies them, whatever the
    file says: a tokenizer.json that does the other is refused before writing; where llama.cpp is built, it
    shows why (its ids for "abc" follow the pre-tokenizer's rule, not the tokenizer's)."""
    from transformers import AutoTokenizer

    split = _split(LLAMA3_SPLIT if pre == "llama-bpe" else QWEN2_SPLIT)
    ignores = pre == "llama-bpe"
    wrong = _unreachable_word_source(tmp_path / "wrong", split, not ignores)
    with pytest.raises(BuildError, match=f"llama.cpp's '{pre}' pre-tokenizer {'ignores' if ignores else 'applies'}"):
        build(load(str(wrong)), tmp_path / "out_wrong", formats=["hf", "gguf"], progress=False)
    assert not (tmp_path / "out_wrong").exists()
    right = _unreachable_word_source(tmp_path / "right", split, ignores)
    out = build(load(str(right)), tmp_path / "out", formats=["hf", "gguf"], progress=False)
    assert _field(_reader(out), "tokenizer.ggml.pre") == pre
    text = "abc xabc abc"
    got = llama_cpp_tokens(_llama_cpp(), out / "model.gguf", text)
    assert got == AutoTokenizer.from_pretrained(right).encode(text, add_special_tokens=False)
    assert got != AutoTokenizer.from_pretrained(wrong).encode(text, add_special_tokens=False)


def _merged_twice(root: Path, split, ignore_merges: bool = False):
    """A merge of a merge, each with tokenizer_source union: the outer merged tokenizer's base is the inner
    merged one, whose base is the first source (sources with vocabularies of their own)."""
    src = [_byte_level_source(root / name, split, ignore_merges, extra=extra, seed=i)
           for i, (name, extra) in enumerate((("a", ""), ("b", "zebra quagga 7777"), ("c", "xylophone jukebox")))]
    inner = merge.linear([load(str(src[0])), load(str(src[1]))], weights=[0.5, 0.5], tokenizer_source="union")
    return merge.linear([inner, load(str(src[2]))], weights=[0.5, 0.5], tokenizer_source="union"), src


def test_a_merged_tokenizer_of_a_merged_tokenizer_is_planned_from_the_first_base(tmp_path):
    """The pre-tokenizer of a merged vocabulary is its base's; for a merge of merges, the base's base's. The plan
    finds it (before this, it saw no tokenizer there, and the refusal below came only once the hf files were
    written); llama.cpp, where built, tokenizes as the merged tokenizer does."""
    from transformers import AutoTokenizer

    from compose.lower.tokenizer import MergedTokenizer
    from compose.pipeline import _plan_gguf, compile_graph

    split, ignore_merges = PRE_TOKENIZERS["llama-bpe"]()
    spec, src = _merged_twice(tmp_path / "src", split, ignore_merges)
    g = compile_graph(spec)
    assert isinstance(g.state.tokenizer, MergedTokenizer) and isinstance(g.state.tokenizer.base, MergedTokenizer)
    assert _plan_gguf(g).vocab.pre == "llama-bpe"
    out = build(spec, tmp_path / "out", formats=["hf", "gguf"], progress=False)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) > len(AutoTokenizer.from_pretrained(src[0]))  # the union holds b's and c's own tokens
    assert _field(_reader(out), "tokenizer.ggml.pre") == "llama-bpe"
    assert len(_field(_reader(out), "tokenizer.ggml.tokens")) == json.loads((out / "config.json").read_text())[
        "vocab_size"]
    text = TEXT + " zebra quagga xylophone"
    assert llama_cpp_tokens(_llama_cpp(), out / "model.gguf", text) == tok.encode(text, add_special_tokens=False)


def test_a_merged_tokenizer_of_a_merged_tokenizer_is_refused_in_the_plan(tmp_path):
    from compose.pipeline import _plan_gguf, compile_graph

    spec, _ = _merged_twice(tmp_path / "src", _split(r"\p{L}+|\p{N}+|[^\s\p{L}\p{N}]+|\s+"))
    with pytest.raises(BuildError, match="regex llama.cpp does not compute"):
        _plan_gguf(compile_graph(spec))


def test_sentencepiece_model_without_tokenizer_json_is_refused_before_writing(tmp_path):
    src = save_hf_model(tmp_path / "src", "llama", layers=1)
    (src / "tokenizer.model").write_bytes(b"\x0a\x00")  # copied by the build, and llama.cpp reads none of it
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="tokenizer.model is a SentencePiece tokenizer without tokenizer.json"):
        build(load(str(src)), out, formats=["hf", "gguf"], progress=False)
    assert not out.exists()


def test_sharded_checkpoint_is_read_through_its_index(tmp_path):
    out = build(load("tiny:llama?layers=2"), tmp_path / "out", formats=["hf", "gguf"], progress=False,
                max_shard_size="40kB")
    assert (out / "model.safetensors.index.json").is_file()
    got = {t.name: _as_torch(t) for t in _reader(out).tensors}
    want = _expected(out, "llama")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_deepseekmoe_output_used_as_a_source_is_still_deepseek(tmp_path):
    """A DeepSeekMoE output loaded back (to be merged or written again) holds its shared gates as zeros on
    disk, not as compose's `zeros`: the plan looks at their values, so it is written as llama.cpp's deepseek
    again (as qwen2moe its sigmoid(0) is 0/0 = NaN in llama.cpp), with the same tensors as the first build."""
    spec = _builds()["deepseek"]
    first = build(spec, tmp_path / "first", formats=["hf", "gguf"], progress=False)
    again = build(load(str(first)), tmp_path / "again", formats=["hf", "gguf"], progress=False)
    merged = build(merge.linear(load(str(first)), load(str(first)), weight=[0.5, 0.5]), tmp_path / "merged",
                   formats=["hf", "gguf"], progress=False)
    want = {t.name: _as_torch(t) for t in _reader(first).tensors}
    for out in (again, merged):
        r = _reader(out)
        assert r.fields["general.architecture"].contents() == "deepseek"
        got = {t.name: _as_torch(t) for t in r.tensors}
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), out.name
    # A learned gate that is not zero stays qwen2moe.
    assert _reader(built_qwen2moe(tmp_path)).fields["general.architecture"].contents() == "qwen2moe"


def built_qwen2moe(tmp_path):
    return build(_builds()["qwen2moe"], tmp_path / "qwen2moe", formats=["hf", "gguf"], progress=False)


def test_cli_export_gguf_of_an_existing_build(tmp_path, capsys):
    """`compose export OUT --format gguf` writes the model.gguf the build would have written with --format
    gguf (the same tensors and metadata), records it in compose.json, and refuses a tampered shard by name."""
    from compose.cli import main

    spec = _builds()["deepseek"]
    direct = build(spec, tmp_path / "direct", formats=["hf", "gguf"], progress=False)
    out = build(spec, tmp_path / "out", progress=False)
    assert not (out / "model.gguf").exists()
    assert main(["export", str(out), "--format", "gguf"]) == 0
    a, b = _reader(direct), _reader(out)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(torch.equal(_as_torch(x), _as_torch(y)) for x, y in zip(a.tensors, b.tensors))
    keys = [k for k in a.fields if not k.startswith("GGUF.")]
    assert keys == [k for k in b.fields if not k.startswith("GGUF.")]
    assert all(a.fields[k].contents() == b.fields[k].contents() for k in keys)
    record = json.loads((out / "compose.json").read_text())
    assert "model.gguf" in record["files"] and "model.gguf" in record["sha256"]
    from compose.integrity import check

    check(out, weights=True)  # every recorded file, model.gguf included, matches its sha256
    capsys.readouterr()
    assert main(["export", str(out), "--format", "gguf"]) == 2  # written in place: never over a recorded one
    assert "already exported" in capsys.readouterr().err
    # A refusal writes nothing; a shard that changed since the build is named.
    qwen3moe = build(moe.upcycle(load("tiny:qwen3?layers=2"), num_experts=4, norm_topk_prob=False),
                     tmp_path / "qwen3moe", progress=False)
    before = sorted(p.name for p in qwen3moe.iterdir())
    assert main(["export", str(qwen3moe), "--format", "gguf"]) == 2
    assert "norm_topk_prob False" in capsys.readouterr().err
    assert sorted(p.name for p in qwen3moe.iterdir()) == before
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    gguf_bytes = (out / "model.gguf").read_bytes()
    capsys.readouterr()
    assert main(["export", str(out), "--format", "gguf"]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert (out / "model.gguf").read_bytes() == gguf_bytes  # the refused export left the recorded file alone
