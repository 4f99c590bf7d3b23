"""mergekit (0.1.5) as the reference for compose's merge methods, for the peer tests: run one of its merge
methods on a group of tensors, and compare a method's parameters and contract with mergekit's spec."""
from __future__ import annotations

import pytest

from compose.merges.registry import get


def mergekit_merge(method: str, tensors, base, name: str, **params):
    """mergekit's result for `tensors` (the one at index `base` the base model), as the tensor `name`."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(tensors, base_index=base, name=name)
    return registry.get(method)([group], parameters=params)[0]


def assert_spec_matches_mergekit(method: str) -> None:
    """Same parameter names, scopes, defaults, required set and value types, the same base policy, and a
    reference to the paper or code."""
    pytest.importorskip("mergekit")
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import MISSING

    spec, ours = registry.get(method).spec, get(method)
    theirs = {p.name: (p.scope.value, None if p.default is MISSING else p.default) for p in spec.parameters}
    assert {p.name: (p.scope, None if p.required else p.default) for p in ours.params} == theirs
    assert {p.name for p in spec.parameters if p.required} == {p.name for p in ours.params if p.required}
    for p in ours.params:
        hint = next(q for q in spec.parameters if q.name == p.name).value_type
        assert p.kind in (hint, getattr(hint, "__args__", (hint,))[0])
    assert ours.base == spec.contract.base.value
    assert ours.reference
