"""Router rows from data, as mergekit-moe computes them (mergekit/moe/router.py, 0.1.5).

`hidden` and `hidden_avg` run the base model through transformers' own class and take the hidden state
entering each layer (`hidden_states[:-1]`): the last token's (`hidden`) or the mean over tokens
(`hidden_avg`), averaged over the expert's prompts; `cheap_embed` sums the prompts' token embeddings and
uses that one vector for every layer. The negative prompts' vector is subtracted, then each row is
normalised to unit length. Prompts are `bos + prompt` without other special tokens, as mergekit does.

Deliberate differences from mergekit: each prompt runs on its own (mergekit pads a batch, so with
right padding its "last token" can be a pad for the shorter prompts), in float32 (mergekit loads bf16).
The prompts are tokenized with the tokenizer the output ships. Models without tokenizer files (the built-in
tiny ones) tokenize prompts as UTF-8 bytes modulo the vocabulary, with bos_token_id first: deterministic
and documented, but only meaningful for tests. A composed base (up-scaled, merged) runs in transformers
from the config.json and tensors its family would write, evaluated in memory: no backend, no folder.

The rows are computed when the build first evaluates one (`later_gate_vectors`), never while lowering:
`compose inspect` prints the router without running the model; what would refuse them (a prompt list per
expert, a base transformers can run) is checked while lowering all the same.
"""
from __future__ import annotations

import threading
from pathlib import Path

from compose.errors import SpecError
from compose.ir.graph import Graph
from compose.ir.weights import Load


def later_gate_vectors(base: Graph, spec, num_experts: int, path: str, ctx, dtype):
    """gate_vectors in `dtype`, as a function of no arguments that computes them the first time it is
    called (by whichever build thread gets there first) and returns the same tensor after; what would
    refuse them is refused now."""
    _check(base, spec, num_experts, path, ctx)
    lock, done = threading.Lock(), []

    def rows():
        with lock:
            if not done:
                done.append(gate_vectors(base, spec, num_experts, path, ctx).to(dtype))
        return done[0]
    return rows


def _check(base: Graph, spec, num_experts: int, path: str, ctx) -> None:
    if len(spec.prompts) != num_experts:
        raise SpecError(f"{path}.router.prompts: {len(spec.prompts)} prompt lists for {num_experts} experts")
    if spec.init != "cheap_embed":
        _model_folder(base, ctx)


def gate_vectors(base: Graph, spec, num_experts: int, path: str, ctx):
    """(layers, experts, hidden) float32 router rows for every layer of `base`."""
    import torch

    _check(base, spec, num_experts, path, ctx)
    tokenize = _tokenizer(base, ctx)
    if spec.init == "cheap_embed":
        embed = _evaluate(base.embedding.params()["weight"], ctx).float()
        n = len(base.blocks())

        def vector(prompts):
            s = embed[torch.cat([tokenize(p) for p in prompts])].sum(0, keepdim=True)  # (1, hidden)
            return (s / s.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(n, 1)
    else:
        model = _transformers_model(base, ctx)

        def vector(prompts):
            states = []
            for p in prompts:
                with torch.no_grad():
                    out = model(tokenize(p)[None], output_hidden_states=True, return_dict=True)
                h = torch.stack(out.hidden_states[:-1])[:, 0]  # (layers, seq, hidden)
                states.append(h.mean(1) if spec.init == "hidden_avg" else h[:, -1])
            return torch.stack(states).mean(0)  # (layers, hidden)

    rows = []
    for e in range(num_experts):
        v = vector(spec.prompts[e])
        if spec.negative and spec.negative[e]:
            v = v - vector(spec.negative[e])
        rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, dim=1)  # (layers, experts, hidden)


def random_rows(spec, layers: int, rows: int, hidden: int):
    """(layers, rows, hidden) float32 random router rows: N(0, std) (`random`) or U(-1/sqrt(hidden),
    1/sqrt(hidden)) (`uniform_random`, torch.nn.Linear's init). `draw="whole"` draws the block at once from
    torch.Generator().manual_seed(seed), with mergekit-moe's expressions (torch.randn(shape), and
    torch.rand(shape) * 2 * scale - scale), so that after `mergekit-moe --random-seed seed` (which seeds
    torch's global generator and draws nothing else first) the two agree bit for bit (mergekit's `random`
    has std 1). `per_layer` draws layer i from (seed, i)."""
    import math

    import torch

    from compose.ir.weights import derive_seed

    def draw(shape, seed):
        g = torch.Generator().manual_seed(seed)
        if spec.init == "random":
            return torch.randn(shape, generator=g) * spec.std  # times 1.0 is exact: std=1 is mergekit's draw
        scale = math.sqrt(1.0 / hidden)
        return torch.rand(shape, generator=g) * 2 * scale - scale

    if spec.draw == "whole":
        return draw((layers, rows, hidden), spec.seed)
    return torch.stack([draw((rows, hidden), derive_seed(spec.seed, "router", i)) for i in range(layers)])


def _reader(ctx):
    return lambda e: ctx.open(e.source).tensor(e.key)


def _evaluate(expr, ctx):
    from compose.ir.evaluate import Evaluator

    return Evaluator([expr], _reader(ctx))(expr)


def _tokenizer(g: Graph, ctx):
    """The prompts' tokenizer: the one the output ships (the graph's tokenizer source), else bytes."""
    from compose.lower.text import text_tokenizer

    t = g.state.tokenizer
    if t is not None and not isinstance(t, str):  # a merged vocabulary: built for the output
        encode, _ = text_tokenizer(None, g.config.vocab, g.config.bos_token_id, tokenizer=t.build())
        return encode
    folder = ctx.open(t).folder if t is not None else None
    encode, _ = text_tokenizer(folder, g.config.vocab, g.config.bos_token_id)
    return encode


def _transformers_model(g: Graph, ctx):
    """transformers' own model for `g`: from its source folder when `g` is that model unchanged, else built
    from the config.json and tensors its family writes for it (evaluated in memory; nothing written)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from compose import families
    from compose.ir.evaluate import Evaluator

    hf_logging.disable_progress_bar()  # compose prints its own progress; transformers' bars would interleave
    folder = _model_folder(g, ctx)
    if folder is not None:
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    family = families.get(g.config.family)
    config = family.config_json(g)
    named = {k: e for _, part in family.tensors(g) for k, e in part.items()}
    evaluate = Evaluator(named.values(), _reader(ctx))
    state = {k: evaluate(e).float() for k, e in named.items()}
    cls = getattr(transformers, family.architecture)
    config = AutoConfig.for_model(**{**config, "dtype": "float32"})
    return cls.from_pretrained(None, config=config, state_dict=state, dtype=torch.float32).eval()


def _model_folder(g: Graph, ctx) -> Path | None:
    """The folder transformers loads `g` from, or None where `g` is built from the config.json and tensors
    its family writes; refused where that family has no transformers class for it."""
    from compose import families

    folder = _whole_source(g, ctx)
    if folder is None:
        why = families.get(g.config.family).refuse(g)
        if why is not None:
            raise SpecError(f"the router's base model has no transformers class to run it in ({why})")
    return folder


def _whole_source(g: Graph, ctx) -> Path | None:
    """The folder `g` was loaded from, when it is that model unchanged (every weight a Load of it under
    its own name, every layer there), else None."""
    from compose import families

    w = g.embedding.params()["weight"]
    if not isinstance(w, Load):
        return None
    src = ctx.open(w.source)
    if src.folder is None or len(g.blocks()) != src.num_layers:
        return None
    for _, part in families.get(g.config.family).tensors(g):
        for name, e in part.items():
            if not (isinstance(e, Load) and e.source == w.source and e.key == name):
                return None
    return src.folder
