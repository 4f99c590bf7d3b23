from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from compose.ir import Graph
from compose.ir.weights import Expr, Merge, Scale, _Nary, _Unary
from compose.passes.base import Pass


def _same_dtype(e: Merge) -> bool:
    # Folding skips the cast to the compute dtype, so it is exact only when there is none.
    return e.compute is None or all(x.dtype == e.compute for x in e.inputs)


def _param(e: Merge, name: str, default=None):
    return dict(e.params).get(name, default)


# (match, rewrite) rules, each exact: it changes no output bit.
RULES = [
    # passthrough([x], scale=1) -> x   (scale is per input: a 1-tuple, None when unset)
    (lambda e: isinstance(e, Merge) and e.method == "passthrough" and len(e.inputs) == 1
     and tuple(_param(e, "scale", (None,))) in ((None,), (1.0,)) and _same_dtype(e), lambda e: e.inputs[0]),
    # linear([x], w) -> x when normalised (w*x/w) or w == 1
    (lambda e: isinstance(e, Merge) and e.method == "linear" and len(e.inputs) == 1 and _same_dtype(e)
     and (_param(e, "normalize") or tuple(_param(e, "weight", ())) == (1.0,)), lambda e: e.inputs[0]),
    # scale(x, 1) -> x
    (lambda e: isinstance(e, Scale) and e.factor == 1.0, lambda e: e.x),
]


def fold(e: Expr, memo: dict) -> Expr:
    """Rewrite bottom-up until no rule applies; shared sub-expressions are rewritten once."""
    if e in memo:
        return memo[e]
    out = e
    if isinstance(e, _Unary):
        out = dataclasses.replace(e, x=fold(e.x, memo))
    elif isinstance(e, _Nary) and e.inputs:
        out = dataclasses.replace(e, inputs=tuple(fold(x, memo) for x in e.inputs))
    for match, rewrite in RULES:
        if match(out):
            out = fold(rewrite(out), memo)
            break
    memo[e] = out
    return out


@dataclass(frozen=True)
class Fold(Pass):
    """Weight-expression folding: exact algebraic identities (passthrough of one model, a normalised
    linear merge of one model, scale by 1) are removed, so the dump and compose.json show plain loads
    and the writer reads instead of computing."""

    name = "fold"

    def run(self, g: Graph) -> Graph:
        memo: dict = {}
        ops = {}
        for n, op in g.items():
            params = op.params()
            new = {k: fold(e, memo) for k, e in params.items()}
            changed = {k: e for k, e in new.items() if e is not params[k]}
            if changed:
                ops[n] = op.with_weights(**changed)
        return g.replace(ops) if ops else g
