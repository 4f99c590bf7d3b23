"""The merge DSL: `merge.<method>(models, ...)` for every method mergekit 0.1.5 registers.

    from compose import load, merge
    model = merge.linear([a, b], weights=[0.7, 0.3])                 # SPHINX's beta-mix with beta = 0.7
    model = merge.slerp(a, b, t={"self_attn": [0.2, 0.6], "mlp": [0.9, 0.1], "*": 0.35})
    model = merge.ties(base=base, models=[ft1, ft2], density=[0.3, 0.6], weights=[1.0, 0.5])

A model may be given with parameters of its own as `(model, {"weight": 0.3})`. Keyword parameters use
mergekit's names (`weights` is accepted for `weight`, `lambda_` for `lambda`); a list given for a per-model parameter with one
value per model is split across the models, any other value applies to all (a list is then a gradient).
"""
from __future__ import annotations

from pydantic import ValidationError

from compose.errors import SpecError
from compose.spec import MergeInput, MergeSpec, describe_validation_error

__all__ = ["merge", "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_linear",
           "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "model_stock", "sce",
           "nearswap", "arcee_fusion", "ram", "ramplus_tl", "passthrough"]


def _input(m) -> MergeInput:
    if isinstance(m, MergeInput):
        return m
    if isinstance(m, tuple) and len(m) == 2 and isinstance(m[1], dict):
        return MergeInput(model=m[0], parameters=m[1])
    return MergeInput(model=m)


def merge(method: str, models, *, base=None, seed: int = 0, dtype: str | None = None, out_dtype: str | None = None,
          tokenizer_source: str | None = None, parameters: dict | None = None, **params) -> MergeSpec:
    """Merge `models` tensor by tensor with `method` (see compose.merges for the list)."""
    from compose.merges.registry import get

    fn = f"merge.{method}"
    m = get(method, fn)
    try:
        inputs = [_input(x) for x in models]
    except ValidationError as e:
        raise SpecError(describe_validation_error(e, f"{fn}.models")) from None
    if "weights" in params:
        params["weight"] = params.pop("weights")
    if "lambda_" in params:  # `lambda` is a Python keyword
        params["lambda"] = params.pop("lambda_")
    shared = dict(parameters or {})
    in_base = base is not None and any(i.model == base for i in inputs)
    for name, value in params.items():
        p = m.param(name)
        if p is None:
            raise SpecError(f"{fn}.{name}: {method} has no parameter {name!r} "
                            f"(it takes {', '.join(p.name for p in m.params) or 'none'})")
        targets = [i for i, x in enumerate(inputs) if p.scope == "input" or not (in_base and x.model == base)]
        if p.scope != "shared" and isinstance(value, (list, tuple)) and len(value) == len(targets) \
                and all(not isinstance(v, (dict, list)) for v in value):
            for i, v in zip(targets, value):
                inputs[i] = MergeInput(model=inputs[i].model, parameters={**inputs[i].parameters, name: v})
        else:
            shared[name] = value
    try:
        return MergeSpec(method=method, models=inputs, base=base, parameters=shared, seed=seed, dtype=dtype,
                         out_dtype=out_dtype, tokenizer_source=tokenizer_source)
    except ValidationError as e:
        raise SpecError(describe_validation_error(e, fn)) from None


def _method(name: str):
    def f(*models, base=None, **kw):
        if "models" in kw:
            models = tuple(kw.pop("models"))
        elif len(models) == 1 and isinstance(models[0], list):
            models = tuple(models[0])
        return merge(name, list(models), base=base, **kw)

    f.__name__ = f.__qualname__ = name
    f.__doc__ = f"Merge models with mergekit's `{name}` method: merge.{name}(models, base=..., **parameters)."
    return f


def slerp(a, b, *, t, **kw) -> MergeSpec:
    """Spherical interpolation from `a` (t=0, the base) to `b` (t=1), per tensor."""
    return merge("slerp", [a, b], base=a, t=t, **kw)


linear = _method("linear")
nuslerp = _method("nuslerp")
multislerp = _method("multislerp")
karcher = _method("karcher")
task_arithmetic = _method("task_arithmetic")
ties = _method("ties")
dare_linear = _method("dare_linear")
dare_ties = _method("dare_ties")
breadcrumbs = _method("breadcrumbs")
breadcrumbs_ties = _method("breadcrumbs_ties")
della = _method("della")
della_linear = _method("della_linear")
model_stock = _method("model_stock")
sce = _method("sce")
nearswap = _method("nearswap")
arcee_fusion = _method("arcee_fusion")
ram = _method("ram")
ramplus_tl = _method("ramplus_tl")
passthrough = _method("passthrough")
