"""Shared fixtures: tiny models written by transformers itself, and helpers to build and run them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

VOCAB = 512


def hf_config(family: str, layers: int = 8, hidden: int = 64, tie: bool = False, **kw):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "phi3": Phi3Config, "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig}[family]
    args = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
    if family == "mistral":
        args["sliding_window"] = 16
    if family == "qwen3":
        args["head_dim"] = 2 * hidden // 4  # Qwen3's head_dim is its own field, not hidden / heads
    if family == "phi3":
        args.update(pad_token_id=0, sliding_window=16)  # Phi3Config's default pad id is past VOCAB
    if family in ("gemma2", "gemma3"):
        # A head_dim and a query_pre_attn_scalar of their own, caps low enough to bend these small logits and
        # scores, a window of 16 that sequences of 40 cross, sliding and global layers.
        args.update(head_dim=32, query_pre_attn_scalar=24, sliding_window=16, final_logit_softcapping=2.0,
                    layer_types=["sliding_attention" if i % 3 != 2 else "full_attention"
                                 for i in range(kw.get("num_hidden_layers", layers))])
    if family == "gemma2":
        args["attn_logit_softcapping"] = 0.05
    if family == "gemma3":  # Gemma 3's two ropes: a scaled global one, a local one with its own theta
        args["rope_parameters"] = {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
    return cls(**{**args, **kw})


def save_hf_model(folder: Path, family: str, seed: int = 0, shard: str | None = None, perturb_all: bool = False,
                  **cfg) -> Path:
    """A randomly initialised model of transformers' own class, saved with save_pretrained. `perturb_all`
    nudges every weight (biases start at zero in transformers' init, which would hide a bias misread)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **cfg), dtype=torch.float32)
    # Norm gains of exactly 1 would hide a norm taken from the wrong layer: perturb them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif perturb_all:
                p.add_(0.02 * torch.randn_like(p))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def token_ids(batch: int = 2, seq: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


def manifest(folder: Path) -> dict:
    return json.loads((folder / "compose.json").read_text())


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def traced_decode_step(module, model, ids, inputs=None, attention_mask=None):
    """(the runtime's decode step traced by dynamo with fullgraph=True, the same step eager): a step that
    reads a tensor on the host (as CUDA-graph capture forbids) fails to trace."""
    from compose.backends import runtime

    prefill, decode, counters = runtime._steps(module, model, ids, 4, inputs or {}, attention_mask)
    torch._dynamo.reset()
    with torch.no_grad():
        token = prefill(ids)[:, -1:].argmax(-1)
        before = [c.clone() for c in counters]
        expected = decode(token)
        for c, b in zip(counters, before):
            c.copy_(b)  # the same step again, traced
        traced = torch.compile(decode, fullgraph=True, backend="eager", dynamic=False)(token)
    return traced, expected


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny matrices gain nothing from intra-op threads, and on a busy 2-core machine their spinning
    makes small steps up to 100x slower. (Spawned processes and subprocesses set their own.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """Source folders, one per family; qwen2, qwen3 and the Gemmas tie their embeddings, llama is sharded
    into several files."""
    root = tmp_path_factory.mktemp("sources")
    return {
        "llama": save_hf_model(root / "llama", "llama", seed=1, shard="100KB"),
        "mistral": save_hf_model(root / "mistral", "mistral", seed=2),
        "qwen2": save_hf_model(root / "qwen2", "qwen2", seed=3, tie=True),
        "qwen3": save_hf_model(root / "qwen3", "qwen3", seed=4, tie=True),
        "phi3": save_hf_model(root / "phi3", "phi3", seed=5),
        "gemma2": save_hf_model(root / "gemma2", "gemma2", seed=6, tie=True),
        "gemma3": save_hf_model(root / "gemma3", "gemma3", seed=7, tie=True),
    }


@pytest.fixture(scope="session")
def onnx_build(tmp_path_factory):
    """get(name, spec) -> the folder of `spec()` built with --format hf,onnx, once per session under `name`:
    the ONNX tests and the Optimum and onnxruntime-genai tests read the same builds (an export of a tiny
    model takes tens of seconds). Readers must not change the folders."""
    from compose import build

    root = tmp_path_factory.mktemp("onnx_builds")
    made: dict[str, Path] = {}

    def get(name: str, spec) -> Path:
        if name not in made:
            made[name] = build(spec(), root / name, formats=["hf", "onnx"], progress=False)
        return made[name]

    return get
