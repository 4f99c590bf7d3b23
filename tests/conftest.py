"""Shared fixtures: tiny models written by transformers itself, and helpers to build and run them."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from compose import families

VOCAB = 512


@dataclass(frozen=True)
class Case:
    """One hand-written family's test models (FAMILY_CASES): what the tests need to know of a family beyond
    what its module says."""

    model: dict = field(default_factory=dict)
    """transformers config arguments of the family's small test model (hf_config), on top of the common ones."""
    full_every: int | None = None
    """Sliding and full layers (`layer_types`): every full_every-th layer attends to every earlier token."""
    round_trip: dict = field(default_factory=dict)
    """What test_families' 3-layer round trip adds: the family's optional parts switched on."""
    tie: bool = False
    """hf_models (and the codegen and runtime models) tie the embeddings, as the family's checkpoints do."""
    shard: str | None = None
    """hf_models saves it in shards of this size (exercises the index)."""
    seed: int = 0
    """hf_models' seed."""
    upcycled: str | None = None
    """The class moe.upcycle of its hf_models model is written as (families with MoE classes)."""


GEMMA = dict(head_dim=32, query_pre_attn_scalar=24, sliding_window=16, final_logit_softcapping=2.0)
"""Gemma's test models: a head_dim and a query_pre_attn_scalar of their own, a final cap low enough to bend
these small logits, a window of 16 that sequences of 40 cross (with every third layer global)."""
SLIDING_QWEN = dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=12, max_window_layers=1)

FAMILY_CASES = {
    # Every hand-written family with a transformers class, by its tiny name (its model_type where it has no tiny
    # recipe). Adding a family is its module in families/ and one entry here: the tests' family lists are
    # computed from the registry (FAMILY_TYPES, DENSE, MOE below) and the families' properties.
    "llama": Case(round_trip=dict(attention_bias=True, mlp_bias=True), seed=1, shard="100KB",
                  upcycled="MixtralForCausalLM"),
    "mistral": Case(model=dict(sliding_window=16), seed=2, upcycled="MixtralForCausalLM"),
    "qwen2": Case(round_trip=SLIDING_QWEN, tie=True, seed=3, upcycled="Qwen2MoeForCausalLM"),
    # Qwen3's head_dim is its own field, not hidden / heads (twice that at the default width)
    "qwen3": Case(model=dict(head_dim=32), round_trip=SLIDING_QWEN, tie=True, seed=4, upcycled="Qwen3MoeForCausalLM"),
    # Phi3Config's default pad id is past VOCAB
    "phi3": Case(model=dict(pad_token_id=0, sliding_window=16), seed=5,
                 round_trip=dict(sliding_window=12, bos_token_id=1, eos_token_id=2)),
    # Gemma: 1 + w norms, sandwich norms, soft-caps, sliding and global layers, tied head; Gemma 3 adds q/k
    # norms and a local rope. query_pre_attn_scalar differs from head_dim so a scale mistake shows.
    "gemma2": Case(model=dict(GEMMA, attn_logit_softcapping=0.05), full_every=3, tie=True, seed=6,
                   round_trip=dict(sliding_window=12, tie_word_embeddings=True,
                                   layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    # Gemma 3's two ropes: a scaled global one, a local one with its own theta
    "gemma3": Case(model=dict(GEMMA, rope_parameters={
                       "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), full_every=3, tie=True,
                   seed=7,
                   round_trip=dict(sliding_window=12, final_logit_softcapping=20.0, tie_word_embeddings=True,
                                   rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                       "rope_theta": 1e6},
                                                    "sliding_attention": {"rope_type": "default",
                                                                          "rope_theta": 1e4}})),
    # Ministral: Mistral's block with sliding and full layers (every other one full; an upcycle needs Qwen2-MoE's
    # per-layer windows); its class computes no default head_dim
    "ministral": Case(model=dict(head_dim=16, sliding_window=16), full_every=2, seed=8,
                      upcycled="Qwen2MoeForCausalLM"),
    "mixtral": Case(model=dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
                               rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "qwen2_moe": Case(model=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": Case(model=dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                 mlp_only_layers=[1], norm_topk_prob=True, use_sliding_window=True,
                                 sliding_window=12)),
}

FAMILY_TYPES = {families.get(t).tiny_name or t: t for t in families.SOURCES if not families.get(t).generated}
"""Every hand-written family with a transformers class: its test name (its `tiny:` name) -> model_type."""
DENSE = [n for n, t in FAMILY_TYPES.items() if families.get(t).expert_prefix is None]
"""The dense families (hf_models holds one model of each)."""
MOE = [n for n, t in FAMILY_TYPES.items() if families.get(t).expert_prefix is not None]
"""The mixture-of-experts families."""


def hf_config(family: str, layers: int = 8, hidden: int = 64, tie: bool = False, **kw):
    """The config of a small model of `family`'s transformers class (FAMILY_CASES), `kw` on top."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    case = FAMILY_CASES[family]
    args = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie)
    args.update(case.model)
    if case.full_every:  # sliding and full layers: every full_every-th one attends to every earlier token
        n = kw.get("num_hidden_layers", layers)
        args["layer_types"] = ["full_attention" if i % case.full_every == case.full_every - 1 else "sliding_attention"
                               for i in range(n)]
    return CONFIG_MAPPING[FAMILY_TYPES[family]](**{**args, **kw})


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
    """Source folders, one per dense family (8 layers), each tied and sharded as its Case says (qwen2, qwen3
    and the Gemmas tie their embeddings, llama is sharded into several files)."""
    root = tmp_path_factory.mktemp("sources")
    return {n: save_hf_model(root / n, n, seed=FAMILY_CASES[n].seed, shard=FAMILY_CASES[n].shard,
                             tie=FAMILY_CASES[n].tie) for n in DENSE}


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
