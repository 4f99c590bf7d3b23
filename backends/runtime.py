"""The PyTorch runtime: generation from a build folder with a static, preallocated KV cache, greedy or
sampled, and on CUDA the decode step captured in a CUDA graph.

Every kind of build decodes on `StaticKVCache`s: every layer's keys and values live in buffers of the
full length, written in place at the current position, which is itself a device tensor, so a decode step
has fixed shapes and no host sync and can be replayed as a CUDA graph (on CUDA, MoE layers dispatch
through grouped_mm, which needs no sync either). A CALM build holds three (anchor, augmenting model,
cross-attention context), a CogVLM build one plus the next rotary position, also a device tensor.
"""
from __future__ import annotations

from pathlib import Path

from compose.backends.torch import kind, load_module
from compose.errors import BuildError


class StaticKVCache:
    """Preallocated keys and values, (B, n_kv_head, max_len, head_dim) per layer, and the position of the
    next token as a tensor. Same methods as the generated KVCache."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, batch: int, max_len: int, dtype, device):
        import torch

        shape = (batch, n_kv_head, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.max_len = max_len

    @classmethod
    def for_config(cls, config, batch: int, max_len: int, dtype, device) -> "StaticKVCache":
        """The cache of a generated module's Config."""
        return cls(config.n_layer, config.n_kv_head, config.head_dim, batch, max_len, dtype, device)

    def counters(self) -> list:
        """The tensors a step moves on: a warm-up run puts them back."""
        return [self.pos]

    def positions(self, T: int, device):
        import torch

        return self.pos + torch.arange(T, device=device)

    def key_positions(self, T: int, device):
        import torch

        # Every slot: the causal rule (key <= query) hides the ones not written yet.
        return torch.arange(self.max_len, device=device)

    def update(self, layer: int, k, v):
        idx = self.positions(k.size(2), k.device)
        self.keys[layer].index_copy_(2, idx, k)
        self.values[layer].index_copy_(2, idx, v)
        return self.keys[layer], self.values[layer]

    def advance(self, T: int) -> None:
        self.pos += T


class StaticCogVLMCache(StaticKVCache):
    """CogVLM's cache: also the rotary position of the next token (patches share one), per sample."""

    def __init__(self, config, batch: int, max_len: int, dtype, device):
        import torch

        super().__init__(config.n_layer, config.n_kv_head, config.head_dim, batch, max_len, dtype, device)
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)

    def counters(self) -> list:
        return [self.pos, self.next_position]


def calm_cache(module, model, batch: int, max_len: int, context_len: int, dtype, device):
    """A CALM cache of static parts: the cross-attention context holds `context_len` positions (the
    augmenting prompt's length, or max_len when the augmenting model reads the same tokens)."""
    a = model.model.config
    width = a.n_embd // module.HEADS
    return module.CalmCache(StaticKVCache.for_config(a, batch, max_len, dtype, device),
                            StaticKVCache.for_config(model.augment.config, batch, context_len, dtype, device),
                            StaticKVCache(len(module.PAIRS), module.HEADS, width, batch, context_len, dtype, device))


def load(folder: str | Path, device: str = "cpu", dtype: str | None = None):
    """(generated module, model in eval mode on `device`) for the build in `folder`; the module runs from
    code checked against compose.json as it is read (see load_module)."""
    module = load_module(Path(folder))
    model = module.ComposeForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    return module, model


def _pick(logits, temperature: float, top_k: int | None, top_p: float | None, generator):
    """The next token from (B, vocab) logits: argmax at temperature 0, else a sample."""
    import torch

    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits.device)


def generate(module, model, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, cuda_graph: bool | None = None, attention_mask=None,
             **inputs):
    """input_ids (B, T) -> (B, T + max_new_tokens). attention_mask (B, T): a left-padded batch (1: a real
    token, 0: padding), each row continuing as it would alone. `inputs`: CogVLM's
    token_type_ids and images (the prompt's), CALM's augment_ids (the augmenting model's own prompt) and
    augment_attention_mask (its left padding). cuda_graph: decode steps replay a CUDA graph; None = whenever
    the model is on CUDA."""
    import torch

    device = input_ids.device
    if cuda_graph is None:
        cuda_graph = device.type == "cuda"
    if cuda_graph and device.type != "cuda":
        raise BuildError(f"CUDA graphs need the model on a CUDA device; it is on {device}")
    prefill, decode, counters = _steps(module, model, input_ids, max_new_tokens, inputs, attention_mask)
    if cuda_graph:
        decode = _graphed(decode, counters)
    generator = torch.Generator().manual_seed(seed)
    out = [input_ids]
    with torch.no_grad():
        logits = prefill(input_ids)
        for _ in range(max_new_tokens):
            token = _pick(logits[:, -1], temperature, top_k, top_p, generator)
            out.append(token)
            logits = decode(token)
    return torch.cat(out, dim=1)


def _steps(module, model, input_ids, max_new_tokens: int, inputs: dict, attention_mask=None):
    """(prefill, decode, counters) for the build's kind: two functions of token ids to logits over one set
    of static caches, and the caches' counters (the tensors a step moves on)."""
    k = kind(module)
    allowed = {"single": set(), "calm": {"augment_ids", "augment_attention_mask"},
               "cogvlm": {"token_type_ids", "images"}}[k]
    if set(inputs) - allowed:
        raise BuildError(f"a {k} build takes no {', '.join(sorted(set(inputs) - allowed))} "
                         f"(it takes: {', '.join(sorted(allowed)) or 'input_ids only'})")
    B, max_len = input_ids.size(0), input_ids.size(1) + max_new_tokens
    dtype, device = next(model.parameters()).dtype, input_ids.device
    if k == "single":
        cache = StaticKVCache.for_config(model.model.config, B, max_len, dtype, device)
        if attention_mask is not None:
            return _padded_steps(lambda ids, mask, pos: model(ids, cache, mask, pos), cache.max_len, input_ids,
                                 attention_mask, cache.counters())
        step = lambda ids: model(ids, cache)  # noqa: E731
        return step, step, cache.counters()
    if k == "calm":
        aug, aug_mask = inputs.get("augment_ids"), inputs.get("augment_attention_mask")
        if aug_mask is not None:
            if aug is None:
                raise BuildError("augment_attention_mask: given without augment_ids (it is their padding)")
            _check_mask(aug_mask, aug, "augment_attention_mask")
        cache = calm_cache(module, model, B, max_len, max_len if aug is None else aug.size(1), dtype, device)
        counters = cache.anchor.counters() + cache.augment.counters() + cache.cross.counters()
        if attention_mask is None:
            step = lambda ids: model(ids, cache, aug, None, None, aug_mask)  # noqa: E731
            return step, step, counters
        return _padded_steps(lambda ids, mask, pos: model(ids, cache, aug, mask, pos, aug_mask),
                             cache.anchor.max_len, input_ids, attention_mask, counters)
    cache = StaticCogVLMCache(model.model.config, B, max_len, dtype, device)
    # With padding, the mask covers every slot (see _padded_steps); CogVLM counts its rotary positions itself
    # (an image run shares one), from the mask, on the cache's own per-row counter.
    full = None if attention_mask is None else _padding(max_len, input_ids, attention_mask)[0]
    return ((lambda ids: model(ids, inputs.get("token_type_ids"), inputs.get("images"), cache, full)),
            (lambda ids: model(ids, None, None, cache, full)), cache.counters())


def _padded_steps(call, max_len: int, input_ids, attention_mask, counters: list):
    """Steps for a left-padded batch, `call(ids, mask, positions)` being the model's forward on its static
    cache(s) of `max_len` slots, whose `counters` a step moves. The mask covers every cache slot, and is
    fixed for the whole generation: the prompt's padding hidden, every later slot real (the causal rule
    hides those not written yet), so a decode step has fixed inputs. Rotary positions count each row's real
    tokens, as transformers counts them: the prompt's from its mask, then one device counter per row (B,)
    that each decode step reads and moves on, like the cache's own position."""
    full, prompt_positions, next_position = _padding(max_len, input_ids, attention_mask)

    def prefill(ids):
        return call(ids, full, prompt_positions)

    def decode(ids):
        logits = call(ids, full, next_position[:, None])
        next_position.add_(1)
        return logits

    return prefill, decode, counters + [next_position]


def _check_mask(mask, ids, name: str):
    """A left-padded 0/1 mask of the prompt's shape, or a BuildError naming what is wrong."""
    if mask.shape != ids.shape:
        raise BuildError(f"{name}: shape {tuple(mask.shape)}, expected the prompt's {tuple(ids.shape)}")
    real = mask.bool()
    if bool((mask != real.long()).any()):
        raise BuildError(f"{name}: must hold only 0 (padding) and 1 (a real token)")
    if bool((real[:, :-1] & ~real[:, 1:]).any()) or not bool(real[:, -1].all()):
        raise BuildError(f"{name}: rows must be left-padded (padding, then real tokens up to the last "
                         "column), as generation continues after each row's last token")
    return real


def _padding(max_len: int, input_ids, attention_mask):
    """(mask over every one of `max_len` cache slots, the prompt's rotary positions, each row's next position
    as a (B,) device counter) for a left-padded prompt (see _padded_steps)."""
    import torch

    real = _check_mask(attention_mask.to(input_ids.device), input_ids, "attention_mask")
    B, T = input_ids.shape
    full = torch.ones((B, max_len), dtype=torch.long, device=input_ids.device)
    full[:, :T] = real.long()
    prompt_positions = (real.long().cumsum(dim=-1) - 1).clamp(min=0)  # padding: 0, never attended to
    return full, prompt_positions, real.long().sum(dim=-1)  # the last: (B,) each row's real tokens so far


def _warm_up(decode, ids, counters: list, runs: int = 2) -> None:
    """Run the decode step `runs` times on `ids`, then put the cache's counters back: the keys and values
    it wrote sit at the slots the real step overwrites next, so the generation is as if it never ran."""
    saved = [c.clone() for c in counters]
    for _ in range(runs):
        decode(ids)
        for c, s in zip(counters, saved):
            c.copy_(s)


def _graphed(decode, counters: list):
    """The one-token decode step as a replayed CUDA graph, captured on first use after warm-up runs on a
    side stream (so lazy initialisation and autotuning stay out of the graph). The step reads its
    token from a static buffer and writes its logits to another; the caches are updated in place."""
    import torch

    state = {}

    def step(ids):
        if "graph" not in state:
            static_ids = ids.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                _warm_up(decode, static_ids, counters)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_logits = decode(static_ids)  # recorded, not run: the counters have not moved
            state.update(graph=graph, ids=static_ids, logits=static_logits)
        state["ids"].copy_(ids)
        state["graph"].replay()
        return state["logits"]

    return step
