"""Merge parameters resolved for one tensor, with mergekit's rules.

A setting is a scalar; a gradient (a list of numbers interpolated at t, the layer's position in its
slice from 0 to 1); a list of {filter, value} conditions where the first whose filter is contained in the
tensor's name wins (None or `*` matches all); or our dict shorthand {filter: value}. Settings are searched
from the highest precedence down (the model's own, then the merge's layers); the first that yields a value
wins, else the method's default. Every value is checked and the error names the field it came from.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from compose.errors import SpecError
from compose.merges.api import Method, Param


class Conditional(NamedTuple):
    """One {filter, value} condition: the spec's Conditional, or an entry of the dict shorthand."""

    filter: str | None
    value: object

Layer = tuple[str, dict]  # (spec path of the parameters dict, the dict)


def _conditions(setting) -> list[Conditional] | None:
    if isinstance(setting, dict):
        return [Conditional(filter=k, value=v) for k, v in setting.items()]
    if isinstance(setting, list) and setting and all(hasattr(c, "filter") and hasattr(c, "value") for c in setting):
        return [Conditional(c.filter, c.value) for c in setting]
    return None


def _check(p: Param, value, path: str):
    kind = p.kind
    if kind is bool:
        if not isinstance(value, bool):
            raise SpecError(f"{path}: {p.name} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)  # YAML reads 1e-3 as a string
            except ValueError:
                raise SpecError(f"{path}: {p.name} must be a number, got {value!r}") from None
        else:
            raise SpecError(f"{path}: {p.name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SpecError(f"{path}: {p.name} must be a finite number, got {value!r}")
    value = int(value) if kind is int else float(value)
    if p.name == "density" and not 0 < value <= 1:
        raise SpecError(f"{path}: density {value} is outside (0, 1]")
    return value


def evaluate(setting, p: Param, tensor: str, t: float, layers: int, path: str):
    """The value of one setting for `tensor` at `t`, or None when no condition matches."""
    conds = _conditions(setting)
    if conds is not None:
        for i, c in enumerate(conds):
            if c.filter in (None, "*") or (tensor and c.filter in tensor):
                return evaluate(c.value, p, tensor, t, layers, _cond_path(path, setting, i, c))
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        if len(setting) > max(layers, 1) and len(setting) > 1:
            raise SpecError(f"{path}: a gradient of {len(setting)} values is longer than the "
                            f"{layers} layers it spreads over")
        values = [_check(p, v, path) for v in setting]
        if p.kind is bool:
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        i0 = int(scaled)
        i1 = min(len(values) - 1, i0 + 1)
        frac = scaled - i0
        return _check(p, (1 - frac) * values[i0] + frac * values[i1], path)
    return _check(p, setting, path)


def resolve(p: Param, layers: list[Layer], tensor: str, t: float, n_layers: int, what: str):
    for path, params in layers:
        if p.name in params:
            v = evaluate(params[p.name], p, tensor, t, n_layers, f"{path}.{p.name}")
            if v is not None:
                return v
    if p.required:
        raise SpecError(f"{layers[-1][0] if layers else what}: {what} needs parameter {p.name!r}"
                        f" (for {tensor})")
    return p.default


def check_known(method: Method, layers: list[Layer]) -> None:
    known = {p.name for p in method.params}
    for path, params in layers:
        for k in params:
            if k not in known:
                raise SpecError(f"{path}.{k}: {method.name} has no parameter {k!r} "
                                f"(it takes {', '.join(sorted(known)) or 'none'})")


def _cond_path(path: str, setting, i: int, c: Conditional) -> str:
    return f"{path}[{c.filter!r}]" if isinstance(setting, dict) else f"{path}[{i}].filter"


def check_filters(layers: list[Layer], names: set[str]) -> None:
    """A filter contained in no tensor name is a typo that would silently change nothing: refuse it."""
    for path, params in layers:
        for k, setting in params.items():
            for i, c in enumerate(_conditions(setting) or []):
                if c.filter not in (None, "*") and not any(c.filter in n for n in names):
                    raise SpecError(f"{_cond_path(f'{path}.{k}', setting, i, c)}: filter {c.filter!r} "
                                    "matches no tensor of these models")
