"""The mixture-of-experts DSL: dense models in, MoE models out (lazy spec nodes, like the rest of the DSL).

    from compose import load, moe
    dense = load("tiny:llama")
    model = moe.upcycle(dense, num_experts=8, top_k=2)                      # Mixtral sparse upcycling
    model = moe.from_experts(base=dense, experts=[m1, m2, m3, m4], top_k=2,  # mergekit-moe
                             router=moe.hidden_router(prompts=[["def f(x):"], ["Once upon"], ...]))
    model = moe.fine_grained(dense, segments=4, routed=16, shared=2, top_k=4, preserve=True)  # DeepSeekMoE

Common options: `layers=[...]` (which layers become MoE; default all), `every=k` (every k-th layer),
`first_k_dense=k` (keep the first k layers dense), `noise=std` with `seed` (seeded noise on expert copies),
`norm_topk_prob`, `jitter` and `aux_loss_coef` (recorded in config.json for training).
`from_experts` also takes mergekit-moe's per-expert options: `shared_expert=model` (its whole FFN in every
layer; always on, or gated by one more router row with `shared_gate=True`), `expert_noise=[std, ...]` and
`residual_scale=[factor, ...]` (one per expert, the shared expert last). A mergekit-moe YAML is read into
exactly these (compose/mergekit_moe_config.py).
"""
from __future__ import annotations

from compose.dsl import _make
from compose.spec import MoESpec, RouterSpec

__all__ = ["upcycle", "from_experts", "fine_grained", "hidden_router", "cheap_embed", "random", "uniform_random",
           "zeros"]


def upcycle(model, *, num_experts: int, top_k: int = 2, router: RouterSpec | None = None, **options) -> MoESpec:
    """Sparse upcycling: every (chosen) layer's FFN copied into `num_experts` experts behind a top-k router.

    At init every expert is the dense FFN, so the model computes the dense function (exactly with a zeros
    router and top-2: the weights are 1/2 and 1/2; within rounding of the renormalised top-k otherwise)."""
    return _make(MoESpec, "moe.upcycle", kind="upcycle", model=model, num_experts=num_experts, top_k=top_k,
                 **_router(router), **options)


def from_experts(*, base, experts: list, top_k: int = 2, router: RouterSpec | None = None, **options) -> MoESpec:
    """An MoE from several dense models of one shape: attention, norms and embeddings from `base`, expert e
    of layer i is `experts[e]`'s layer-i FFN, router rows from `router` (mergekit-moe's construction)."""
    return _make(MoESpec, "moe.from_experts", kind="from_experts", model=base, experts=list(experts),
                 top_k=top_k, **_router(router), **options)


def fine_grained(model, *, segments: int, routed: int, shared: int = 0, top_k: int = 2, preserve: bool = False,
                 router: RouterSpec | None = None, **options) -> MoESpec:
    """DeepSeekMoE fine-grained experts: each FFN cut into `segments` row blocks of width I/segments;
    `routed` experts are copies of segment e % segments, `shared` experts are always on.

    With `preserve=True` the dense FFN itself is the shared part (cut into `shared` experts of width
    I/shared, or one when shared=0) and the routed experts' down projections start at zero, so the model
    computes exactly the dense function at init, bit for bit, whatever the router does."""
    return _make(MoESpec, "moe.fine_grained", kind="fine_grained", model=model, segments=segments,
                 routed=routed, shared=shared, top_k=top_k, preserve=preserve, **_router(router), **options)


def _router(router) -> dict:
    return {} if router is None else {"router": router}


def hidden_router(prompts: list[list[str]], negative: list[list[str]] | None = None, *,
                  average: bool = False) -> RouterSpec:
    """Router rows from the base model's hidden states on each expert's prompts (mergekit-moe `hidden`;
    `average=True` is `hidden_avg`): the build runs the base model once per prompt (`compose inspect` does
    not), so a router takes at most MAX_PROMPTS prompts in all, of MAX_PROMPT_CHARS each (compose.spec)."""
    return _make(RouterSpec, "moe.hidden_router", init="hidden_avg" if average else "hidden", prompts=prompts,
                 negative=negative)


def cheap_embed(prompts: list[list[str]], negative: list[list[str]] | None = None) -> RouterSpec:
    """Router rows from the summed token embeddings of each expert's prompts, the same for every layer."""
    return _make(RouterSpec, "moe.cheap_embed", init="cheap_embed", prompts=prompts, negative=negative)


def random(seed: int = 0, std: float = 0.02, *, draw: str = "per_layer") -> RouterSpec:
    """Router rows drawn from N(0, std) with `seed`. `draw="whole"` draws every layer's rows at once, as
    mergekit-moe's `random` gate does after `--random-seed seed` (there with std=1)."""
    return _make(RouterSpec, "moe.random", init="random", seed=seed, std=std, draw=draw)


def uniform_random(seed: int = 0, *, draw: str = "per_layer") -> RouterSpec:
    """Router rows drawn from U(-1/sqrt(hidden), 1/sqrt(hidden)), torch.nn.Linear's initialisation
    (mergekit-moe's `uniform_random`; `draw="whole"` as in `random`)."""
    return _make(RouterSpec, "moe.uniform_random", init="uniform_random", seed=seed, draw=draw)


def zeros() -> RouterSpec:
    """A zero router: every expert equally likely; top-k then takes the first k."""
    return _make(RouterSpec, "moe.zeros", init="zeros")
