"""What a merge method is: a name, an input contract, typed parameters, and one tensor function.

Every method in this package registers a `Method` (see registry.py). The function receives the input
tensors of one output tensor, already cast to one compute dtype, in the order the spec lists the models,
with `base` the index of the base model among them (or None):

    fn(tensors: list[Tensor], base: int | None, *, seed: int | None, name: str, **params) -> Tensor

Parameter values arrive resolved for this one tensor (gradients and filters are applied before):
- scope "shared": one scalar;
- scope "input": a list aligned with `tensors`;
- scope "non_base": a list aligned with the non-base tensors (`[t for i, t in enumerate(tensors) if i != base]`).
`seed` is set for random methods (`Method.random`) and None otherwise; `name` is the output tensor's
Hugging Face name (some methods treat embeddings differently). Functions must not modify their inputs
and must be deterministic for a given seed. The names, scopes and defaults follow mergekit 0.1.5, so a
mergekit config means the same thing here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

MISSING = object()

Scope = Literal["shared", "input", "non_base"]
BasePolicy = Literal["required", "optional", "ignored", "forbidden"]


@dataclass(frozen=True)
class Param:
    name: str
    scope: Scope
    default: object = MISSING
    kind: type = float
    """float, int or bool: what a value must be (YAML `1` is a valid float)."""

    @property
    def required(self) -> bool:
        return self.default is MISSING


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable
    base: BasePolicy = "ignored"
    params: tuple[Param, ...] = ()
    random: bool = False
    min_inputs: int = 1
    max_inputs: int | None = None
    reference: str = ""
    """The paper or reference code the math follows."""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)
