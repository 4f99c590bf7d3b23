"""Spec models: what the user asked for, validated and serialisable (YAML/JSON specs are these, dumped).

A spec is a tree of composition nodes, each with an `op` tag. The Python DSL (`compose.dsl`) builds these
same objects, so a `.py` spec and a `.yaml` spec of the same composition are the same value.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator

from compose.errors import SpecError

DType = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(DType)
"""The dtypes compose writes."""


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LoadSpec(_Node):
    """A model source: a local Hugging Face folder, a hub id, or `tiny:<family>?seed=..&layers=..`."""

    op: Literal["load"] = "load"
    ref: str = Field(min_length=1)
    dtype: Optional[DType] = None


class ExpandSpec(_Node):
    """LLaMA-Pro: `per_group` identity blocks after each of `groups` groups (or after `positions`)."""

    op: Literal["expand_blocks"] = "expand_blocks"
    model: "ModelSpec"
    groups: Optional[PositiveInt] = None
    per_group: PositiveInt = 1
    positions: Optional[list[NonNegativeInt]] = None

    @model_validator(mode="after")
    def _one_placement(self):
        if (self.groups is None) == (self.positions is None):
            raise ValueError("give exactly one of groups and positions")
        return self


class UpscaleSpec(_Node):
    """SOLAR depth up-scaling: layers [0, n-drop) then [drop, n)."""

    op: Literal["depth_upscale"] = "depth_upscale"
    model: "ModelSpec"
    drop: PositiveInt


class LayersSpec(_Node):
    """Layers [start, stop) of a model (half-open, like mergekit's layer_range)."""

    op: Literal["layers"] = "layers"
    model: "ModelSpec"
    start: NonNegativeInt
    stop: PositiveInt

    @model_validator(mode="after")
    def _ordered(self):
        if self.start >= self.stop:
            raise ValueError(f"start ({self.start}) must be less than stop ({self.stop})")
        return self


class StackSpec(_Node):
    """Slices stacked in order: embeddings from the first slice's model, final norm and head from the last's
    (mergekit's passthrough rule; a tied head stays tied to the embeddings)."""

    op: Literal["stack"] = "stack"
    slices: list["ModelSpec"] = Field(min_length=1)


Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class Conditional(_Node):
    """A parameter value for the tensors whose name contains `filter` (None or `*`: every tensor)."""

    filter: Optional[str] = None
    value: ScalarOrGradient


# A merge parameter, as mergekit reads one: a scalar; a gradient (a list interpolated across the layers);
# a list of {filter, value} where the first filter contained in the tensor's name wins; or, in the Python
# DSL, a dict {filter: value} meaning the same list in order.
Setting = Union[Scalar, list[Scalar], list[Conditional], dict[str, ScalarOrGradient]]


class MergeInput(_Node):
    """One model of a merge, with parameters that apply to it alone (they win over the merge's)."""

    model: "ModelSpec"
    parameters: dict[str, Setting] = Field(default_factory=dict)


class MergeSpec(_Node):
    """Tensor-by-tensor merge of models of one architecture by a named method (compose.merges)."""

    op: Literal["merge"] = "merge"
    method: str
    models: list[MergeInput] = Field(min_length=1)
    base: Optional["ModelSpec"] = None
    """The base model: one of `models` (the same spec) or an extra input appended after them."""
    parameters: Union[dict[str, Setting], list[dict[str, Setting]]] = Field(default_factory=dict)
    """Method parameters for every model; a list is layered, first wins (mergekit's slice, then global)."""
    seed: int = 0
    """Seeds the random methods (DARE, DELLA): each tensor draws from (seed, its name)."""
    dtype: Optional[DType] = None
    """Compute dtype the inputs are cast to (mergekit's `dtype`); default: their promoted dtype."""
    out_dtype: Optional[DType] = None
    """Output dtype (mergekit's `out_dtype`); default: `dtype`, else the config's."""
    tokenizer_source: Optional[str] = None
    """`base`, `union` or a model: the output vocabulary, rows remapped onto it (compose.tokenizer_merge);
    default: tokenizer files copied from the base or first model."""

    @model_validator(mode="after")
    def _known_method(self):
        from compose.merges.registry import NAMES

        if self.method not in NAMES:
            raise ValueError(f"unknown merge method {self.method!r} (methods: {', '.join(NAMES)})")
        return self


ModelSpec = Annotated[Union[LoadSpec, ExpandSpec, UpscaleSpec, LayersSpec, StackSpec, MergeSpec],
                      Field(discriminator="op")]

for _cls in (ExpandSpec, UpscaleSpec, LayersSpec, StackSpec, MergeInput, MergeSpec):
    _cls.model_rebuild()


class BuildSpec(_Node):
    """A whole spec file: the model to build (YAML/JSON specs have exactly this shape)."""

    version: Literal[1] = 1
    model: ModelSpec


def describe_validation_error(e: ValidationError, root: str) -> str:
    """One sentence naming the field: `model.groups: Input should be greater than 0`."""
    err = e.errors()[0]
    loc = ([root] if root else []) + [f"[{p}]" if isinstance(p, int) else str(p)
                                      for p in err["loc"] if p not in _OP_TAGS]
    path = ".".join(loc).replace(".[", "[") or "spec"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{path}: {msg}"


_OP_TAGS = {"load", "expand_blocks", "depth_upscale", "layers", "stack", "merge"}


def parse_build_spec(data: object, origin: str) -> BuildSpec:
    try:
        return BuildSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{origin}: {describe_validation_error(e, '')}") from None
