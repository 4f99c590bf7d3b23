"""Task-arithmetic family (task_arithmetic, ties, dare_*, breadcrumbs*, della*), sce and ram/ramplus_tl:
bit-for-bit conformance with mergekit 0.1.5 (marker `peer`), the math checked by hand, and bad input."""
from __future__ import annotations

import pytest
import torch

from compose.merges.registry import get
from mergekit_ref import assert_spec_matches_mergekit, mergekit_merge

GTA = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
       "della_linear"]
ALL = GTA + ["sce", "ram", "ramplus_tl"]
NAME = "model.layers.0.mlp.up_proj.weight"


def merge(method: str, tensors, base, seed=None, **params):
    m = get(method)
    return m.fn(tensors, base, seed=seed if seed is not None or not m.random else 0, name=NAME, **params)


def mergekit(method: str, tensors, base, **params):
    return mergekit_merge(method, tensors, base, NAME, **params)


def models(shape, n: int, dtype=torch.float32, seed: int = 0, sparse: float = 0.0):
    """n random tensors; with `sparse`, that fraction of each non-first tensor's entries equals the first's
    (so RAM sees entries some models leave unchanged)."""
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(shape, generator=g) for _ in range(n)]
    for t in ts[1:]:
        same = torch.rand(shape, generator=g) < sparse
        t[same] = ts[0][same]
    return [t.to(dtype) for t in ts]


def as_base_at(ts, base: int):
    """Move ts[0] (the base in `models`) to index `base`, keeping the others in order."""
    rest = ts[1:]
    return rest[:base] + [ts[0]] + rest[base:]


# --- conformance with mergekit ------------------------------------------------------------------------------

# (method, parameters for two non-base models); lists are per non-base model, the rest shared
PEER_CASES = [
    ("task_arithmetic", {"weight": [1.0, 0.5]}),
    ("task_arithmetic", {"weight": [0.7, 0.3], "normalize": True, "lambda": 1.5}),
    ("task_arithmetic", {"weight": [1.0, -1.0], "normalize": True}),           # weights sum to 0: divisor 1
    ("ties", {"weight": [1.0, 0.5], "density": [0.3, 0.6]}),
    ("ties", {"weight": [1.0, -0.5], "density": [0.5, 1.0], "normalize": False, "int8_mask": True}),
    ("ties", {"weight": [0.4, 0.6], "density": [0.01, 0.2], "rescale": True, "lambda": 0.8}),
    ("breadcrumbs", {"weight": [1.0, 0.5], "density": [0.5, 0.6], "gamma": [0.1, 0.05]}),
    ("breadcrumbs", {"weight": [1.0, 0.5], "density": [0.9, 0.95], "gamma": [0.2, 0.3], "rescale": True}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.5], "density": [0.4, 0.7]}),
    ("breadcrumbs_ties", {"weight": [0.5, 0.5], "density": [0.4, 0.7], "gamma": 0.1, "normalize": True,
                          "int8_mask": True}),
    ("dare_ties", {"weight": [1.0, 0.5]}),
    ("dare_ties", {"weight": [1.0, 0.5], "normalize": True, "lambda": 0.5}),
    ("dare_linear", {"weight": [0.6, 0.4], "normalize": True}),
    ("della", {"weight": [1.0, 0.5], "epsilon": [0.1, 0.3]}),
    ("della_linear", {"weight": [1.0, 0.5], "lambda": 2.0}),
    ("sce", {}),
    ("sce", {"select_topk": 0.3}),
    ("sce", {"select_topk": 0.5, "int8_mask": True}),
    ("ram", {}),
    ("ram", {"epsilon": 0.5}),
    ("ramplus_tl", {}),
    ("ramplus_tl", {"r": 0.5, "alpha": 0.9, "epsilon": 1e-3}),
]


def _widen(params: dict, n: int) -> dict:
    """Extend the two-model lists of PEER_CASES to n non-base models (repeat the last value)."""
    return {k: (v + [v[-1]] * (n - len(v)) if isinstance(v, list) else v) for k, v in params.items()}


@pytest.mark.peer
@pytest.mark.parametrize("method,params", PEER_CASES, ids=lambda x: x if isinstance(x, str) else "")
@pytest.mark.parametrize("shape", [(12, 20), (37,)], ids=["2d", "1d"])
@pytest.mark.parametrize("n_models,base", [(2, 0), (3, 1), (3, 3)], ids=["base0+2", "base1+3", "base3+3"])
def test_matches_mergekit(method, params, shape, n_models, base):
    params = _widen(params, n_models)
    ts = as_base_at(models(shape, n_models + 1, sparse=0.4), base)
    before = [t.clone() for t in ts]
    ours = merge(method, ts, base, **params)
    ref = mergekit(method, ts, base, **params)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)                 # bit-identical, same dtype/shape
    assert all(torch.equal(a, b) for a, b in zip(ts, before)), "inputs were modified"


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {"weight": [1.0, 0.3], "lambda": 0.9}),
    ("ties", {"weight": [1.0, 0.3], "density": [0.3, 0.7]}),
    ("ties", {"weight": [0.5, 0.5], "density": [0.5, 0.5], "int8_mask": True, "normalize": False}),
    ("breadcrumbs_ties", {"weight": [1.0, 0.3], "density": [0.5, 0.6], "gamma": 0.05}),
    ("sce", {"select_topk": 0.4}),
    ("ram", {}),
    ("ramplus_tl", {}),   # returns float32 for half inputs, as mergekit does
], ids=lambda x: x if isinstance(x, str) else "")
def test_matches_mergekit_other_dtypes(method, params, dtype):
    ts = models((16, 24), 3, dtype=dtype, seed=5, sparse=0.3)
    ours = merge(method, ts, 0, **params)
    ref = mergekit(method, ts, 0, **params)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.peer
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_at_density_one_match_mergekit(method):
    ts = as_base_at(models((10, 10), 3, seed=2), 1)
    params = {"weight": [0.8, 0.4], "density": [1.0, 1.0]}
    torch.testing.assert_close(merge(method, ts, 1, **params), mergekit(method, ts, 1, **params), rtol=0, atol=0)


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("shape", [(9, 14), (50,), (3, 4, 5)], ids=["2d", "1d", "3d"])
def test_random_methods_reproduce_mergekit_given_seed(method, shape, dtype):
    """Our seeded generator makes the same draws, in the same order, as mergekit after torch.manual_seed."""
    ts = as_base_at(models(shape, 4, dtype=dtype, seed=3), 2)
    params = {"weight": [1.0, 0.5, 0.25], "density": [0.3, 0.6, 0.5]}
    if method.startswith("della"):
        params["epsilon"] = [0.1, 0.2, 0.05]
    ours = merge(method, ts, 2, seed=1234, **params)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        ref = mergekit(method, ts, 2, **params)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.peer
@pytest.mark.parametrize("method", ALL)
def test_parameters_match_mergekit_spec(method):
    assert_spec_matches_mergekit(method)
    assert get(method).base == "required"  # every task-arithmetic method needs a base (so mergekit's too)


def test_only_dare_and_della_are_random():
    assert {m for m in ALL if get(m).random} == {"dare_ties", "dare_linear", "della", "della_linear"}


# --- the math, by hand ----------------------------------------------------------------------------------------

def test_task_arithmetic_of_one_model_is_that_model():
    base, m = models((6, 7), 2, seed=9)
    out = merge("task_arithmetic", [base, m], 0, weight=[1.0])
    torch.testing.assert_close(out, m)


def test_task_arithmetic_sums_weighted_deltas():
    base = torch.tensor([1.0, 2.0, 3.0])
    a, b = base + torch.tensor([2.0, 0.0, -4.0]), base + torch.tensor([1.0, 1.0, 1.0])
    out = merge("task_arithmetic", [a, base, b], 1, weight=[0.5, 2.0], **{"lambda": 0.5})
    # base + 0.5 * (0.5 * [2, 0, -4] + 2 * [1, 1, 1]) = base + 0.5 * [3, 2, 0]
    assert torch.equal(out, torch.tensor([2.5, 3.0, 3.0]))
    normalized = merge("task_arithmetic", [a, base, b], 1, weight=[0.5, 2.0], normalize=True)
    assert torch.equal(normalized, base + torch.tensor([3.0, 2.0, 0.0]) / 2.5)


def test_ties_by_hand():
    base = torch.ones(6)
    d1 = torch.tensor([3.0, -1.0, 0.5, -4.0, 2.0, 0.1])
    d2 = torch.tensor([-2.0, 2.0, 1.0, -1.0, -3.0, 0.2])
    # density 0.5 keeps 3 of 6 by magnitude: d1 -> [3, 0, 0, -4, 2, 0], d2 -> [-2, 2, 0, 0, -3, 0]
    # weights 1, 1: column sums [1, 2, 0, -4, -1, 0] elect [+, +, +, -, -, +]; matching entries kept, averaged
    out = merge("ties", [base, base + d1, base + d2], 0, weight=[1.0, 1.0], density=[0.5, 0.5])
    assert torch.equal(out, base + torch.tensor([3.0, 2.0, 0.0, -4.0, -3.0, 0.0]))
    # weights 1, 0.5: d2 scaled to [-1, 1, 0, 0, -1.5, 0]; sums [2, 1, 0, -4, 0.5, 0] now elect + at index 4,
    # and each kept entry is divided by the kept models' weights: index 1 -> 1 / 0.5 = 2, index 4 -> 2 / 1
    out = merge("ties", [base, base + d1, base + d2], 0, weight=[1.0, 0.5], density=[0.5, 0.5])
    assert torch.equal(out, base + torch.tensor([3.0, 2.0, 0.0, -4.0, 2.0, 0.0]))


def test_breadcrumbs_drops_top_gamma_and_the_smallest():
    mags = torch.arange(1.0, 11.0)                                          # 1..10
    delta = (mags * torch.tensor([1, -1] * 5))[torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])]
    base = torch.zeros(10)
    # n = 10, density 0.5 keeps 5, gamma 0.2 drops the top 2 (9, 10), so the smallest 3 go: keep |d| in 4..8
    out = merge("breadcrumbs", [base, delta], 0, weight=[1.0], density=[0.5], gamma=[0.2])
    assert torch.equal(out, torch.where((delta.abs() >= 4) & (delta.abs() <= 8), delta, 0.0))
    # density 0.9 + gamma 0.2 > 1: keep 9, so only the top 1 (10) goes and nothing small
    out = merge("breadcrumbs", [base, delta], 0, weight=[1.0], density=[0.9], gamma=[0.2])
    assert torch.equal(out, torch.where(delta.abs() <= 9, delta, 0.0))


def test_dare_keeps_about_density_and_rescale_preserves_l1():
    base = torch.zeros(500, 400)
    m = torch.ones(500, 400)
    plain = merge("dare_linear", [base, m], 0, seed=7, weight=[1.0], density=[0.3], rescale=False)
    kept = (plain != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.005                                          # ~7 standard deviations
    assert set(plain.unique().tolist()) == {0.0, 1.0}
    scaled = merge("dare_linear", [base, m], 0, seed=7, weight=[1.0], density=[0.3])
    assert torch.equal(scaled != 0, plain != 0)                             # same seed, same mask
    torch.testing.assert_close(scaled.abs().sum(), m.abs().sum())           # L1 rescaling


@pytest.mark.parametrize("rescale,expected_factor", [(True, 1.0), (False, 0.4)])
def test_dare_rescale_makes_the_expected_delta_unbiased(rescale, expected_factor):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, generator=g)
    delta = (1 + torch.rand(200, generator=g)) * torch.sign(torch.randn(200, generator=g))
    n = 2000
    total = torch.zeros(200, dtype=torch.float64)
    for seed in range(n):
        out = merge("dare_linear", [base, base + delta], 0, seed=seed, weight=[1.0], density=[0.4],
                    rescale=rescale)
        total += (out - base).double()
    mean = (total / n).float()
    # each entry: kept with p = 0.4, scaled ~1/p when rescaled; sd of the mean <= 2 * 1.23 / sqrt(2000) ~ 0.055
    assert (mean - expected_factor * delta).abs().max() < 0.3
    assert abs((mean / delta).mean().item() - expected_factor) < 0.02


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_are_deterministic_per_seed(method):
    ts = models((20, 30), 3, seed=4)
    params = {"weight": [1.0, 0.5], "density": [0.5, 0.5]}
    state = torch.random.get_rng_state()
    a = merge(method, ts, 0, seed=11, **params)
    assert torch.equal(torch.random.get_rng_state(), state), "the global generator was used"
    assert torch.equal(a, merge(method, ts, 0, seed=11, **params))
    assert not torch.equal(a, merge(method, ts, 0, seed=12, **params))


def test_della_keep_probability_rises_linearly_with_magnitude_rank():
    m_entries, density, epsilon, n = 11, 0.5, 0.2, 3000
    delta = torch.arange(1.0, m_entries + 1)[torch.randperm(m_entries, generator=torch.Generator().manual_seed(1))]
    base = torch.zeros(m_entries)
    kept = torch.zeros(m_entries)
    for seed in range(n):
        out = merge("della_linear", [base, delta], 0, seed=seed, weight=[1.0], density=[density],
                    epsilon=[epsilon], rescale=False)
        kept += (out != 0).float()
    freq = kept / n
    rank = delta - 1                                                         # 0 (smallest) .. 10 (largest)
    expected = (density - epsilon) + 2 * epsilon * rank / (m_entries - 1)   # 0.3 .. 0.7
    assert (freq - expected).abs().max() < 0.045                            # sd <= 0.0092
    assert freq.min() > density - epsilon - 0.045 and freq.max() < density + epsilon + 0.045


def test_della_ranks_each_row_separately():
    # 4000 rows of 1..8 times a per-row scale from 1 to 1000: ranked globally, the large rows would be kept
    # far more often; ranked per row, every row keeps rank r with the same probability 0.2 + 0.6 * r / 7
    rows = 4000
    scale = torch.linspace(1.0, 1000.0, rows).unsqueeze(1)
    delta = scale * torch.arange(1.0, 9.0)
    base = torch.zeros_like(delta)
    out = merge("della_linear", [base, delta], 0, seed=3, weight=[1.0], density=[0.5], epsilon=[0.3],
                rescale=False)
    expected = 0.2 + 0.6 * torch.arange(8.0) / 7
    kept = (out != 0).float()
    for half in (kept[: rows // 2], kept[rows // 2:]):                     # sd of each frequency <= 0.0112
        assert (half.mean(dim=0) - expected).abs().max() < 0.05


def test_sce_by_hand():
    base = torch.zeros(3)
    a = torch.tensor([1.0, 1.0, 2.0])
    b = torch.tensor([3.0, 3.0, -2.0])
    # weights: mean squares 2 and 22/3 -> w = [3/14, 11/14]; column sums [4, 4, 0] elect +,
    # so index 2 keeps only a's +2 (weight 3/14 / 3/14 = 1)
    out = merge("sce", [base, a, b], 0)
    wa, wb = 3 / 14, 11 / 14
    torch.testing.assert_close(out, torch.tensor([wa * 1 + wb * 3, wa * 1 + wb * 3, 2.0]))


def test_ram_by_hand():
    base = torch.full((4,), 10.0)
    a = base + torch.tensor([1.0, 0.0, 2.0, 0.0])
    b = base + torch.tensor([0.0, 3.0, 4.0, 0.0])
    # index 0 / 1 changed by one model only: taken whole; index 2 by both: averaged; index 3 by none
    assert torch.equal(merge("ram", [base, a, b], 0), base + torch.tensor([1.0, 3.0, 3.0, 0.0]))
    # ramplus_tl: each model has 1 shared and 1 unique entry -> rho 1, clamped to alpha 0.2 -> lambda 1.02
    out = merge("ramplus_tl", [base, a, b], 0)
    torch.testing.assert_close(out, base + torch.tensor([1.02, 3.06, 3.0, 0.0]))


def test_ramplus_tl_returns_float32_for_bfloat16_like_mergekit():
    ts = models((4, 4), 3, dtype=torch.bfloat16, sparse=0.5)
    assert merge("ramplus_tl", ts, 0).dtype == torch.float32
    assert merge("ram", ts, 0).dtype == torch.bfloat16


@pytest.mark.parametrize("method", ALL)
def test_base_alone_is_returned(method):
    base = torch.randn(3, 4)
    params = {"weight": []} if method in GTA else {}
    assert torch.equal(merge(method, [base], 0, **params), base)


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.0, -0.2, 1.5])
@pytest.mark.parametrize("method", GTA)
def test_density_outside_unit_interval_is_refused(method, density):
    ts = models((4, 5), 3)
    with pytest.raises(ValueError, match="density"):
        merge(method, ts, 0, weight=[1.0, 1.0], density=[0.5, density])


@pytest.mark.parametrize("method", ALL)
def test_no_base_is_refused(method):
    ts = models((4, 5), 2)
    params = {"weight": [1.0, 1.0]} if method in GTA else {}
    with pytest.raises(ValueError, match="base"):
        merge(method, ts, None, **params)


def test_della_epsilon_must_keep_probabilities_inside_unit_interval():
    ts = models((4, 5), 2)
    with pytest.raises(ValueError, match="epsilon"):
        merge("della", ts, 0, weight=[1.0], density=[0.9], epsilon=[0.15])


def test_della_on_single_entry_rows_is_refused_clearly():
    with pytest.raises(ValueError, match="dim 1"):
        merge("della", models((4, 1), 2), 0, weight=[1.0], density=[0.5])


def test_wrong_number_of_weights_is_refused():
    with pytest.raises(ValueError, match="weight"):
        merge("ties", models((4, 5), 3), 0, weight=[1.0])


def test_sce_select_topk_outside_unit_interval_is_refused():
    with pytest.raises(ValueError, match="select_topk"):
        merge("sce", models((4, 5), 3), 0, select_topk=0.0)
