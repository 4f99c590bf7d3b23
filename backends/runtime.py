"""The PyTorch runtime: generation from a build folder with a static, preallocated KV cache, greedy or
sampled, and on CUDA the decode step captured in a CUDA graph.

One-model builds (dense, merged, MoE) run on `StaticKVCache`: every layer's keys and values live in
buffers of the full length, written in place at the current position, which is itself a device tensor,
so a decode step has fixed shapes and no host sync and can be replayed as a CUDA graph (on CUDA, MoE
layers dispatch through grouped_mm, which needs no sync either). CALM and CogVLM builds run their own
caches (eager).
"""
from __future__ import annotations

from pathlib import Path

from compose.backends.onnx import kind, load_module
from compose.errors import BuildError


class StaticKVCache:
    """Preallocated keys and values, (B, n_kv_head, max_len, head_dim) per layer, and the position of the
    next token as a tensor. Same methods as the generated KVCache."""

    def __init__(self, config, batch: int, max_len: int, dtype, device):
        import torch

        shape = (batch, config.n_kv_head, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layer)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.max_len = max_len

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


def load(folder: str | Path, device: str = "cpu", dtype: str | None = None):
    """(generated module, model in eval mode on `device`) for the build in `folder`."""
    import torch

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
             top_p: float | None = None, seed: int = 0, cuda_graph: bool | None = None, **inputs):
    """input_ids (B, T) -> (B, T + max_new_tokens). `inputs` go to the first step (CogVLM's
    token_type_ids and images, CALM's augment_ids). cuda_graph: None = on CUDA for one-model builds."""
    import torch

    k = kind(module)
    device = input_ids.device
    generator = torch.Generator().manual_seed(seed)
    if k == "single":
        cfg = model.model.config
        cache = StaticKVCache(cfg, input_ids.size(0), input_ids.size(1) + max_new_tokens,
                              next(model.parameters()).dtype, device)
        step = lambda ids, first: model(ids, cache)  # noqa: E731
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph:
            step = _graphed(model, cache, input_ids.size(0), step)
    else:
        if cuda_graph:
            raise BuildError(f"CUDA-graph decoding supports one-model builds; this is a {k} build")
        cache = module.CalmCache() if k == "calm" else module.CogVLMCache()
        extra = {"augment_ids": inputs.get("augment_ids")} if k == "calm" else {}

        def step(ids, first):
            if k == "cogvlm":
                return model(ids, inputs.get("token_type_ids") if first else None,
                             inputs.get("images") if first else None, cache)
            return model(ids, cache, **extra)
    out = [input_ids]
    with torch.no_grad():
        logits = model(input_ids, cache) if k == "single" else step(input_ids, True)
        for _ in range(max_new_tokens):
            token = _pick(logits[:, -1], temperature, top_k, top_p, generator)
            out.append(token)
            logits = step(token, False)
    return torch.cat(out, dim=1)


def _graphed(model, cache: StaticKVCache, batch: int, eager):
    """The one-token decode step as a replayed CUDA graph (captured on first use, after warm-up runs on
    a side stream; the cache position is put back after the warm-up so it writes nothing for real)."""
    import torch

    state = {}

    def step(ids, first):
        if "graph" not in state:
            static_ids = ids.clone()
            pos = cache.pos.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(2):
                    model(static_ids, cache)
                    cache.pos.copy_(pos)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_logits = model(static_ids, cache)
            cache.pos.copy_(pos)
            state.update(graph=graph, ids=static_ids, logits=static_logits)
        state["ids"].copy_(ids)
        state["graph"].replay()
        return state["logits"]

    return step
