"""slerp, nuslerp, multislerp, karcher, model_stock, nearswap, arcee_fusion and passthrough: conformance with
mergekit 0.1.5 (marker `peer`), the math checked against the papers by hand, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from compose.merges.registry import get
from mergekit_ref import assert_spec_matches_mergekit, mergekit_merge

METHODS = ["slerp", "nuslerp", "multislerp", "karcher", "model_stock", "nearswap", "arcee_fusion", "passthrough"]
NAME = "model.layers.0.mlp.up_proj.weight"
SHAPES = {  # (shape, the tensor's name)
    "2d": ((12, 20), NAME),
    "1d": ((37,), "model.layers.0.input_layernorm.weight"),
    "embed": ((300, 16), "model.embed_tokens.weight"),
}


def merge(method: str, tensors, base, name: str = NAME, **params):
    return get(method).fn(tensors, base, seed=None, name=name, **params)


def mergekit(method: str, tensors, base, name: str = NAME, **params):
    return mergekit_merge(method, tensors, base, name, **params)


def models(shape, n: int, dtype=torch.float32, seed: int = 0, spread: float = 1.0):
    """n random tensors; the first is a 'base' and the others lie `spread` away from it (task vectors)."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(shape, generator=g)
    ts = [first] + [first + spread * torch.randn(shape, generator=g) for _ in range(n - 1)]
    return [t.to(dtype) for t in ts[:n]]


def with_base_at(ts, base):
    """Move ts[0] to index `base` (None: leave the order, no base), keeping the others in order."""
    if base is None:
        return ts
    rest = ts[1:]
    return rest[:base] + [ts[0]] + rest[base:]


def same(ours, ref):
    """Bit for bit: values, dtype and shape."""
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=0, atol=0, equal_nan=True)


# --- conformance with mergekit --------------------------------------------------------------------------------

# (method, number of inputs, base index or None, parameters); lists are per input / per non-base input
PEER_CASES = [
    ("slerp", 2, 0, {"t": 0.3}),
    ("slerp", 2, 1, {"t": 0.3}),
    ("slerp", 2, 0, {"t": 0.0}),
    ("slerp", 2, 1, {"t": 1.0}),
    ("slerp", 2, 0, {"t": 0.77}),
    ("slerp", 2, 0, {"t": -0.25}),                              # extrapolation is allowed
    ("nuslerp", 2, None, {"weight": [0.3, 0.7]}),
    ("nuslerp", 3, 0, {"weight": [1.0, 2.0]}),
    ("nuslerp", 3, 2, {"weight": [0.5, 0.5], "nuslerp_flatten": False}),
    ("nuslerp", 3, 1, {"weight": [0.2, 0.6], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", 2, None, {"weight": [1.0, -1.0]}),             # weights sum to 0: t = 0.5
    ("nuslerp", 2, None, {"weight": [0.4, 0.6], "nuslerp_flatten": False}),
    ("multislerp", 3, None, {"weight": [0.2, 0.3, 0.5]}),
    ("multislerp", 4, 0, {"weight": [1.0, 2.0, 3.0]}),
    ("multislerp", 4, 3, {"weight": [0.3, 0.3, 0.4], "normalize_weights": False}),
    ("multislerp", 3, 1, {"weight": [0.5, 0.5], "eps": 1e-6}),
    ("multislerp", 2, 0, {"weight": [0.7]}),                    # one non-base model: that model
    ("multislerp", 5, None, {"weight": [0.1, 0.2, 0.3, 0.2, 0.2]}),
    ("karcher", 1, None, {}),
    ("karcher", 2, None, {}),
    ("karcher", 3, None, {"max_iter": 3}),
    ("karcher", 4, None, {"max_iter": 50, "tol": 1e-7}),
    ("karcher", 3, 1, {}),                                     # the base is just another input
    ("model_stock", 3, 0, {}),
    ("model_stock", 4, 3, {}),
    ("model_stock", 3, 1, {"filter_wise": True}),
    ("model_stock", 5, 0, {"filter_wise": True}),
    ("nearswap", 2, 0, {"t": 0.5}),
    ("nearswap", 2, 1, {"t": 0.05}),
    ("nearswap", 2, 0, {"t": 0.0}),
    ("nearswap", 2, 0, {"t": 10.0}),
    ("arcee_fusion", 2, 0, {}),
    ("arcee_fusion", 2, 1, {}),
    ("passthrough", 1, None, {}),
    ("passthrough", 1, None, {"scale": [2.5]}),
    ("passthrough", 1, None, {"scale": [0.0]}),
]


@pytest.mark.peer
@pytest.mark.parametrize("method,n,base,params", PEER_CASES, ids=lambda x: x if isinstance(x, str) else None)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("spread", [1.0, 0.05], ids=["far", "near"])
def test_matches_mergekit(method, n, base, params, shape, spread):
    shape, name = SHAPES[shape]
    ts = with_base_at(models(shape, n, seed=len(PEER_CASES) + n, spread=spread), base)
    before = [t.clone() for t in ts]
    ours = merge(method, ts, base, name=name, **params)
    ref = mergekit(method, ts, base, name=name, **params)
    same(ours, ref)
    assert all(torch.equal(a, b) for a, b in zip(ts, before)), "inputs were modified"


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("method,n,base,params", [
    ("slerp", 2, 0, {"t": 0.4}),
    ("slerp", 2, 1, {"t": 0.9}),
    ("nuslerp", 3, 0, {"weight": [0.3, 0.7]}),
    ("nuslerp", 2, None, {"weight": [0.3, 0.7], "nuslerp_flatten": False}),
    ("multislerp", 4, 0, {"weight": [0.2, 0.3, 0.5]}),
    ("karcher", 3, None, {}),
    ("model_stock", 3, 0, {}),
    ("model_stock", 4, 1, {"filter_wise": True}),
    ("nearswap", 2, 0, {"t": 0.3}),
    ("arcee_fusion", 2, 0, {}),                                  # float32 out for half inputs, as mergekit
    ("passthrough", 1, None, {"scale": [0.5]}),
], ids=lambda x: x if isinstance(x, str) else None)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_matches_mergekit_other_dtypes(method, n, base, params, dtype, shape):
    shape, name = SHAPES[shape]
    ts = with_base_at(models(shape, n, dtype=dtype, seed=7, spread=0.2), base)
    same(merge(method, ts, base, name=name, **params), mergekit(method, ts, base, name=name, **params))


def test_output_dtypes():
    """Everything keeps the inputs' dtype except arcee_fusion, whose float32 mask promotes half inputs."""
    ts = models((6, 8), 3, dtype=torch.bfloat16)
    assert merge("slerp", ts[:2], 0, t=0.5).dtype == torch.bfloat16
    assert merge("model_stock", ts, 0).dtype == torch.bfloat16
    assert merge("arcee_fusion", ts[:2], 0).dtype == torch.float32
    assert merge("arcee_fusion", [t.double() for t in ts[:2]], 0).dtype == torch.float64


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["scaled", "nearly", "antipodal", "equal", "zero"])
@pytest.mark.parametrize("t", [0.25, 0.8])
def test_slerp_colinear_fallback_matches_mergekit(case, t, dtype):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 30, generator=g)
    b = {"scaled": 3 * a, "nearly": 2 * a + 0.01 * torch.randn(40, 30, generator=g), "antipodal": -a,
         "equal": a.clone(), "zero": torch.zeros_like(a)}[case]
    a, b = a.to(dtype), b.to(dtype)
    if case == "nearly" and dtype == torch.float32:
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert 0.9995 < cos < 1                                  # really inside the fallback band
    same(merge("slerp", [a, b], 0, t=t), mergekit("slerp", [a, b], 0, t=t))


@pytest.mark.peer
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_slerp_of_tensors_larger_than_one_chunk_matches_mergekit(dtype):
    """Over 2**20 elements mergekit accumulates norms and dot products chunk by chunk; so do we."""
    a, b = models((1100, 1000), 2, dtype=dtype, seed=11, spread=0.5)
    same(merge("slerp", [a, b], 1, t=0.35), mergekit("slerp", [a, b], 1, t=0.35))


@pytest.mark.peer
@pytest.mark.parametrize("method,params", [
    ("nuslerp", {"weight": [0.3, 0.7]}),
    ("nuslerp", {"weight": [0.3, 0.7], "nuslerp_flatten": False}),
    ("multislerp", {"weight": [0.5, 0.5]}),                     # antipodal: the linear fallback
    ("multislerp", {"weight": [0.25, 0.75]}),
    ("model_stock", {}),
    ("model_stock", {"filter_wise": True}),
    ("karcher", {}),
])
@pytest.mark.parametrize("case", ["scaled", "antipodal", "equal"])
def test_degenerate_task_vectors_match_mergekit(method, params, case):
    """Colinear, antipodal and identical task vectors take mergekit's special branches."""
    g = torch.Generator().manual_seed(5)
    base, d = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    other = {"scaled": base + 3 * d, "antipodal": base - d, "equal": base + d}[case]
    ts = [base, base + d, other]
    b = None if method == "karcher" else 0
    same(merge(method, ts, b, **params), mergekit(method, ts, b, **params))


@pytest.mark.peer
def test_arcee_fusion_of_large_tensors_is_exact_where_mergekit_samples():
    """Above 2**20 elements mergekit estimates the quartiles from a random sample; ours are exact, so the
    masks differ only for the few elements whose importance lies between the two thresholds."""
    a, b = models((1030, 1024), 2, seed=13, spread=0.3)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = mergekit("arcee_fusion", [a, b], 0)
    ours = merge("arcee_fusion", [a, b], 0)
    assert torch.equal(ours, merge("arcee_fusion", [a, b], 0))  # deterministic
    differ = (ours != ref).float().mean().item()
    assert differ < 1e-3
    # and the exact threshold is the one mergekit computes when it does not sample
    from compose.merges.arcee_fusion import importance_scores, quartile_threshold
    imp = importance_scores(b, a)
    ordered = imp.flatten().sort().values
    n = ordered.numel() - 1
    assert quartile_threshold(imp) == ordered[n // 2] + 1.5 * (ordered[3 * n // 4] - ordered[n // 4])


@pytest.mark.peer
@pytest.mark.parametrize("method", METHODS)
def test_parameters_and_contract_match_mergekit_spec(method):
    assert_spec_matches_mergekit(method)


def _counts():
    return [(n, b) for n in range(0, 6) for b in [None, *range(n)]]


@pytest.mark.peer
@pytest.mark.parametrize("method", METHODS)
def test_input_counts_refused_exactly_when_mergekit_refuses(method):
    """For 0..5 inputs, with and without a base at each position: our contract plus the function accept
    exactly the groups mergekit's InputContract accepts."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry

    theirs, m = registry.get(method), get(method)
    params = {"slerp": {"t": 0.5}, "nearswap": {"t": 0.5}}.get(method, {})
    for n, base in _counts():
        try:
            theirs.validate_inputs(list(range(n)), base)
            accepted = True
        except ValueError:
            accepted = False
        ours = m.min_inputs <= n and (m.max_inputs is None or n <= m.max_inputs) \
            and not (m.base == "required" and base is None) and not (m.base == "forbidden" and base is not None)
        if ours:
            ts = models((4, 6), n, seed=n)
            non_base = n - (base is not None and m.base != "ignored")
            kw = dict(params)
            if m.param("weight"):
                kw["weight"] = [1.0] * non_base
            try:
                merge(method, ts, base if m.base != "ignored" else None, **kw)
            except ValueError:
                ours = False
        assert ours == accepted, (n, base)


def test_only_registered_names_and_nothing_is_random():
    assert all(get(m).name == m and not get(m).random for m in METHODS)


# --- the math, by hand ----------------------------------------------------------------------------------------

def test_slerp_endpoints_are_the_models():
    a, b = models((9, 7), 2, seed=1)
    assert torch.equal(merge("slerp", [a, b], 0, t=0.0), a)
    assert torch.equal(merge("slerp", [a, b], 0, t=1.0), b)
    assert torch.equal(merge("slerp", [a, b], 1, t=0.0), b)     # t = 0 is the base, wherever it is


def test_slerp_of_orthogonal_unit_vectors_follows_the_arc():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    mid = merge("slerp", [e1, e2], 0, t=0.5)
    torch.testing.assert_close(mid.norm(), torch.tensor(1.0))
    torch.testing.assert_close(mid @ e1, mid @ e2)              # equal angles: 45 degrees each
    torch.testing.assert_close(mid, torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))
    third = merge("slerp", [e1, e2], 0, t=1 / 3)                # a third of the way: 30 degrees
    torch.testing.assert_close(third, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6), 0.0]))


def test_slerp_keeps_the_norm_of_equal_norm_inputs():
    a, b = models((50,), 2, seed=2)
    b = b / b.norm() * a.norm()
    for t in (0.1, 0.5, 0.9):
        torch.testing.assert_close(merge("slerp", [a, b], 0, t=t).norm(), a.norm())


def test_slerp_of_nearly_colinear_inputs_is_linear():
    a = torch.randn(20, generator=torch.Generator().manual_seed(4))
    b = 2 * a + 1e-3 * torch.randn(20, generator=torch.Generator().manual_seed(5))  # cos > 0.9995
    torch.testing.assert_close(merge("slerp", [a, b], 0, t=0.3), 0.7 * a + 0.3 * b)
    torch.testing.assert_close(merge("slerp", [a, -a], 0, t=0.25), 0.5 * a)           # antipodal too


def test_nuslerp_and_multislerp_of_identical_inputs_return_the_input():
    x = models((6, 5), 1, seed=3)[0]
    torch.testing.assert_close(merge("nuslerp", [x, x.clone()], None, weight=[0.3, 0.7]), x)
    torch.testing.assert_close(merge("multislerp", [x, x.clone(), x.clone()], None, weight=[0.2, 0.3, 0.5]), x)
    base = x - 1
    torch.testing.assert_close(merge("nuslerp", [x, base, x.clone()], 1, weight=[0.3, 0.7]), x)
    torch.testing.assert_close(merge("multislerp", [base, x, x.clone()], 0, weight=[1.0, 2.0]), x)


def test_nuslerp_weights_pick_the_models_and_row_wise_interpolates_each_vector():
    a, b = models((4, 6), 2, seed=6)
    torch.testing.assert_close(merge("nuslerp", [a, b], None, weight=[1.0, 0.0]), a)
    torch.testing.assert_close(merge("nuslerp", [a, b], None, weight=[0.0, 2.0]), b)
    # not flattened, each row (last dim) is its own arc: orthogonal unit rows meet at 45 degrees
    e = torch.eye(4)
    rows = merge("nuslerp", [e, e.roll(1, dims=1)], None, weight=[1.0, 1.0], nuslerp_flatten=False)
    torch.testing.assert_close(rows, (e + e.roll(1, dims=1)) / math.sqrt(2))
    # row_wise: vectors along dim 0, i.e. the columns
    cols = merge("nuslerp", [e, e.roll(1, dims=0)], None, weight=[1.0, 1.0], nuslerp_flatten=False,
                 nuslerp_row_wise=True)
    torch.testing.assert_close(cols, (e + e.roll(1, dims=0)) / math.sqrt(2))


def test_multislerp_of_two_symmetric_inputs_is_the_slerp_midpoint():
    a, b = models((30,), 2, seed=8)
    b = b / b.norm() * a.norm()
    torch.testing.assert_close(merge("multislerp", [a, b], None, weight=[1.0, 1.0]),
                               merge("slerp", [a, b], 0, t=0.5), rtol=1e-5, atol=1e-6)
    e = torch.eye(3)                                            # three orthonormal vectors: the centre
    torch.testing.assert_close(merge("multislerp", list(e), None, weight=[1.0, 1.0, 1.0]),
                               torch.ones(3) / math.sqrt(3))


def test_karcher_mean_of_identical_inputs_is_the_input():
    x = models((5, 7), 1, seed=9)[0]
    torch.testing.assert_close(merge("karcher", [x, x.clone(), x.clone()], None), x)


def test_karcher_mean_is_the_spherical_centre():
    e = torch.eye(3) * 2.0
    torch.testing.assert_close(merge("karcher", [e[0], e[1]], None), torch.tensor([1.0, 1.0, 0.0]) * math.sqrt(2))
    torch.testing.assert_close(merge("karcher", list(e), None), torch.ones(3) * 2 / math.sqrt(3))
    # first-order optimality: the log maps of the inputs at the mean sum to zero
    xs = models((40,), 4, seed=10, spread=0.8)
    m = merge("karcher", xs, None, max_iter=200, tol=1e-7)
    u = m / m.norm()
    logs = torch.zeros(40)
    for x in xs:
        v = x / x.norm()
        theta = torch.arccos((u @ v).clamp(-1, 1))
        logs += theta / torch.sin(theta) * (v - (u @ v) * u)
    assert logs.norm() < 1e-4
    torch.testing.assert_close(m.norm(), sum(x.norm() for x in xs) / 4)   # scaled by the mean norm


def test_model_stock_follows_the_papers_ratio():
    base = torch.tensor([1.0, -2.0])
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])   # unit vectors, 60 degrees
    # k = 2, cos = 1/2: t = 2 * 0.5 / (1 + 0.5) = 2/3; the average is base + [0.75, sqrt(3)/4]
    out = merge("model_stock", [base, base + d1, base + d2], 0)
    torch.testing.assert_close(out, base + 2 / 3 * torch.tensor([0.75, math.sqrt(3) / 4]))
    # k = 3 with pairwise cos 1/2 ((1,1,0), (1,0,1), (0,1,1)): t = 1.5 / 2 = 0.75; average delta (2/3)(1,1,1)
    b3 = torch.tensor([0.5, 1.0, -1.0])
    ds = [torch.tensor(v) for v in ([1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0])]
    torch.testing.assert_close(merge("model_stock", [b3] + [b3 + d for d in ds], 0), b3 + 0.5)
    # orthogonal task vectors: t = 0, the base; identical ones: t = 1, the average
    torch.testing.assert_close(merge("model_stock", [base, base + d1, base + torch.tensor([0.0, 3.0])], 0), base)
    torch.testing.assert_close(merge("model_stock", [base, base + d1, base + d1], 0), base + d1)


def test_model_stock_filter_wise_has_one_ratio_per_row():
    base = torch.zeros(2, 2)
    m1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    m2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])                    # row 0 orthogonal, row 1 identical
    out = merge("model_stock", [base, m1, m2], 0, filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0], [1.0, 0.0]]))


def test_model_stock_at_the_pole_keeps_the_base():
    base, d = torch.zeros(3), torch.tensor([1.0, 2.0, 2.0])
    # k = 2 antipodal: cos = -1, 1 + (k-1) cos = 0
    torch.testing.assert_close(merge("model_stock", [base, base + d, base - d], 0), base)


def test_passthrough_returns_its_input_times_scale():
    x = models((3, 4), 1)[0]
    assert merge("passthrough", [x], None) is x
    assert merge("passthrough", [x], None, scale=[None]) is x
    torch.testing.assert_close(merge("passthrough", [x], None, scale=[0.5]), 0.5 * x)
    assert torch.equal(merge("passthrough", [x], None, scale=[0.0]), torch.zeros_like(x))


def test_nearswap_by_hand():
    base = torch.zeros(4)
    other = torch.tensor([0.05, -0.5, 2.0, 0.0])
    # t = 0.1: w = min(1, 0.1 / |diff|) = [1, 0.2, 0.05, 1 (no difference)]
    torch.testing.assert_close(merge("nearswap", [base, other], 0, t=0.1), torch.tensor([0.05, -0.1, 0.1, 0.0]))
    assert torch.equal(merge("nearswap", [base, other], 0, t=0.0), base)       # nothing swaps
    assert torch.equal(merge("nearswap", [other, base], 1, t=5.0), other)      # everything swaps


def test_arcee_fusion_takes_only_the_outlying_changes():
    g = torch.Generator().manual_seed(12)
    base = torch.randn(21, generator=g)
    # one row: the KL factor is a single positive number, so importance ranks as |change| does.
    # |change| = 1..20 and 100 -> sorted quartiles at indices 5, 10, 15: 6, 11, 16; fence 11 + 1.5 * 10 = 26
    change = torch.cat([torch.arange(1.0, 21.0), torch.tensor([100.0])]) * 1e-2
    change = change[torch.randperm(21, generator=g)] * torch.where(torch.rand(21, generator=g) < 0.5, -1.0, 1.0)
    out = merge("arcee_fusion", [base, base + change], 0)
    taken = change.abs() == 1.0
    assert torch.equal(out[taken], (base + change)[taken])
    assert torch.equal(out[~taken], base[~taken])


# --- bad input -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,n,base,params", [
    ("slerp", 3, 0, {"t": 0.5}),
    ("slerp", 2, None, {"t": 0.5}),
    ("slerp", 1, 0, {"t": 0.5}),
    ("nuslerp", 3, None, {"weight": [1.0, 1.0, 1.0]}),
    ("nuslerp", 2, 0, {"weight": [1.0]}),
    ("nuslerp", 4, 0, {"weight": [1.0, 1.0, 1.0]}),
    ("nuslerp", 3, 0, {"weight": [1.0, 1.0, 1.0]}),            # one weight per non-base model
    ("multislerp", 1, 0, {"weight": []}),
    ("multislerp", 3, None, {"weight": [1.0, 1.0]}),
    ("multislerp", 3, None, {"weight": [1.0, -1.0, 0.0]}),     # cannot be normalised
    ("karcher", 0, None, {}),
    ("model_stock", 2, 0, {}),
    ("model_stock", 3, None, {}),
    ("nearswap", 3, 0, {"t": 0.5}),
    ("nearswap", 2, None, {"t": 0.5}),
    ("arcee_fusion", 3, 0, {}),
    ("arcee_fusion", 2, None, {}),
    ("passthrough", 2, None, {}),
    ("passthrough", 1, None, {"scale": [1.0, 2.0]}),
], ids=lambda x: x if isinstance(x, str) else None)
def test_impossible_input_is_refused(method, n, base, params):
    with pytest.raises(ValueError, match=method):
        merge(method, models((3, 4), n), base, **params)


def test_three_antipodal_inputs_cannot_be_multislerped():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="zero"):
        merge("multislerp", [x, -x, x.clone(), -x], None, weight=[1.0, 1.0, 1.0, 1.0])


@pytest.mark.peer
def test_mergekit_refuses_the_same_bad_input():
    x = torch.randn(10)
    with pytest.raises(ValueError):
        mergekit("multislerp", [x, -x, x.clone(), -x], None, weight=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError):
        mergekit("slerp", models((3, 4), 3), 0, t=0.5)
    with pytest.raises(TypeError, match="Missing required parameter t"):
        mergekit("slerp", models((3, 4), 2), 0)


@pytest.mark.parametrize("method,required", [("slerp", {"t"}), ("nearswap", {"t"}), ("nuslerp", {"weight"}),
                                             ("multislerp", {"weight"}), ("karcher", set()),
                                             ("model_stock", set()), ("arcee_fusion", set()),
                                             ("passthrough", set())])
def test_required_parameters(method, required):
    assert {p.name for p in get(method).params if p.required} == required
    if required:
        ts = models((3, 4), 2)
        with pytest.raises(TypeError):                           # the lowering reports it as a spec error first
            merge(method, ts, 0)
