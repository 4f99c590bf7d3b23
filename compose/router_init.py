"""Router rows from data, as mergekit-moe computes them (mergekit/moe/router.py, 0.1.5).

`hidden` and `hidden_avg` run the base model through transformers' own class and take the hidden state
entering each layer (`hidden_states[:-1]`): the last token's (`hidden`) or the mean over tokens
(`hidden_avg`), averaged over the expert's prompts; `cheap_embed` sums the prompts' token embeddings and
uses that one vector for every layer. The negative prompts' vector is subtracted, then each row is
normalised to unit length. Prompts are `bos + prompt` without other special tokens, as mergekit does.

Deliberate differences from mergekit: each prompt runs on its own (mergekit pads a batch, so with
right padding its "last token" can be a pad for the shorter prompts), in float32 (mergekit loads bf16).
Models without tokenizer files (the built-in tiny ones) tokenize prompts as UTF-8 bytes modulo the
vocabulary, with bos_token_id first: deterministic and documented, but only meaningful for tests.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from compose.errors import SpecError
from compose.ir import Graph, Load
from compose.spec import RouterSpec


def gate_vectors(base: Graph, spec: RouterSpec, num_experts: int, path: str):
    """(layers, experts, hidden) float32 router rows for every layer of `base`."""
    import torch

    if len(spec.prompts) != num_experts:
        raise SpecError(f"{path}.router.prompts: {len(spec.prompts)} prompt lists for {num_experts} experts")
    tokenize = _tokenizer(base)
    if spec.init == "cheap_embed":
        embed = _evaluate(base, base.embedding.params()["weight"]).float()
        n = len(base.blocks())

        def vector(prompts):
            s = embed[torch.cat([tokenize(p) for p in prompts])].sum(0, keepdim=True)  # (1, hidden)
            return (s / s.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(n, 1)
    else:
        model, cleanup = _transformers_model(base)

        def vector(prompts):
            states = []
            for p in prompts:
                with torch.no_grad():
                    out = model(tokenize(p)[None], output_hidden_states=True, return_dict=True)
                h = torch.stack(out.hidden_states[:-1])[:, 0]  # (layers, seq, hidden)
                states.append(h.mean(1) if spec.init == "hidden_avg" else h[:, -1])
            return torch.stack(states).mean(0)  # (layers, hidden)

    try:
        rows = []
        for e in range(num_experts):
            v = vector(spec.prompts[e])
            if spec.negative and spec.negative[e]:
                v = v - vector(spec.negative[e])
            rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    finally:
        if spec.init != "cheap_embed":
            cleanup()
    return torch.stack(rows, dim=1)  # (layers, experts, hidden)


def _evaluate(g: Graph, expr):
    from compose.ir.evaluate import Evaluator
    from compose.sources import open_source

    return Evaluator([expr], lambda e: open_source(e.source).tensor(e.key))(expr)


def _tokenizer(g: Graph):
    from compose.text import embedding_folder, text_tokenizer

    encode, _ = text_tokenizer(embedding_folder(g), g.config.vocab, g.config.source_config().get("bos_token_id"))
    return encode


def _transformers_model(g: Graph):
    """transformers' model for `g`: its source folder when `g` is one model loaded whole, else `g` written
    to a temporary folder by the hf backend (a composed base has no folder to load)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # compose prints its own progress; transformers' bars would interleave
    folder, tmp = _whole_source(g), None
    if folder is None:
        from compose.backends import hf

        tmp = Path(tempfile.mkdtemp(prefix="compose-router-"))
        hf.write(g, tmp, progress=False)
        folder = tmp
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    return model, (lambda: shutil.rmtree(tmp, ignore_errors=True)) if tmp else (lambda: None)


def _whole_source(g: Graph) -> Path | None:
    """The folder `g` was loaded from, when it is that model unchanged (every weight a Load of it under
    its own name), else None."""
    from compose.backends.hf import tensors

    from compose.text import embedding_folder

    folder = embedding_folder(g)
    if folder is None:
        return None
    ref = g.embedding.params()["weight"].source
    for name, e in tensors(g).items():
        if not (isinstance(e, Load) and e.source == ref and e.key == name):
            return None
    from compose.sources import open_source

    return folder if len(g.blocks()) == open_source(ref).num_layers else None
