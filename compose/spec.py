"""Spec models: what the user asked for, validated and serialisable (YAML/JSON specs are these, dumped).

A spec is a tree of composition nodes, each with an `op` tag. The Python DSL (`compose.dsl`) builds these
same objects, so a `.py` spec and a `.yaml` spec of the same composition are the same value.
"""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from compose.errors import SpecError

from compose.ir.config import DTYPES  # noqa: E402  (the dtypes compose writes)

DType = Literal[DTYPES]  # type: ignore[valid-type]


# pydantic's lax mode takes `true` for 1 and `1` for true; a spec that says `groups: true` or
# `preserve: 1` is a mistake to name, not a value to guess. Every number and flag field of every node
# below is one of these types (tests/test_trust_spec.py checks that none is a bare int, float or bool).
def _refuse_bool(what: str):
    def check(v):
        if isinstance(v, bool):
            raise ValueError(f"expected {what}, got a boolean")
        return v
    return BeforeValidator(check)


def _only_bool(v):
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


Int = Annotated[int, _refuse_bool("an integer")]
PositiveInt = Annotated[Int, Field(gt=0)]
NonNegativeInt = Annotated[Int, Field(ge=0)]
Float = Annotated[float, _refuse_bool("a number")]
Bool = Annotated[bool, BeforeValidator(_only_bool)]


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


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


def _leaves(setting, path: str):
    """(path, value) of every scalar in a Setting: itself, a gradient's values, each condition's value."""
    if isinstance(setting, dict):
        for k, v in setting.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    elif isinstance(setting, list):
        for i, v in enumerate(setting):
            if isinstance(v, Conditional):
                yield from _leaves(v.value, f"{path}[{i}].value")
            else:
                yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, setting


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
    seed: Int = 0
    """Seeds the random methods (DARE, DELLA): each tensor draws from (seed, its name)."""
    dtype: Optional[DType] = None
    """Compute dtype the inputs are cast to (mergekit's `dtype`); default: their promoted dtype."""
    out_dtype: Optional[DType] = None
    """Output dtype (mergekit's `out_dtype`); default: `dtype`, else the config's."""
    tokenizer_source: Optional[str] = None
    """`base`, `union` or a model: the output vocabulary, rows remapped onto it (compose.lower.tokenizer);
    default: tokenizer files copied from the base or first model."""

    @model_validator(mode="after")
    def _known_method(self):
        from compose.merges.registry import NAMES

        if self.method not in NAMES:
            raise ValueError(f"unknown merge method {self.method!r} (methods: {', '.join(NAMES)})")
        return self

    @model_validator(mode="after")
    def _parameter_kinds(self):
        """Every value of every known parameter is checked against its kind here, the ones lowering would
        never read included (a global `weight: true` behind per-model weights): a boolean is no number, a
        number no boolean. Ranges, and names the method does not take, are lowering's to check
        (compose.lower.merge_params), where each value is resolved."""
        from compose.merges.registry import get

        method = get(self.method, "method")
        layers = ([("parameters", self.parameters)] if isinstance(self.parameters, dict)
                  else [(f"parameters[{j}]", d) for j, d in enumerate(self.parameters)])
        layers += [(f"models[{i}].parameters", m.parameters) for i, m in enumerate(self.models)]
        for path, params in layers:
            for name, setting in params.items():
                p = method.param(name)
                for where, value in _leaves(setting, f"{path}.{name}") if p is not None else ():
                    if (p.kind is bool) != isinstance(value, bool):
                        want = "true or false" if p.kind is bool else "a number"
                        # the path is below this merge's own: describe_validation_error joins the two
                        raise PydanticCustomError("nested_field", "{text}",
                                                  {"text": f"{where}: {name} must be {want}, got {value!r}"})
        return self


MAX_PROMPTS = 1024
"""The most prompts one router takes, positive and negative together: a build runs the base model once per
prompt (mergekit-moe configs give a few per expert)."""
MAX_PROMPT_CHARS = 64 << 10
"""The longest router prompt, in characters (a prompt is a sentence or a paragraph)."""


class RouterSpec(_Node):
    """How router rows are initialised. `hidden` (last token) and `hidden_avg` (mean over tokens): the hidden
    state entering each layer, averaged over an expert's prompts, minus that of its negative prompts,
    normalised (mergekit-moe's gate modes); `cheap_embed`: the same from token embeddings only, one vector
    for every layer; `random`: N(0, std) from `seed`; `uniform_random`: U(-1/sqrt(hidden), 1/sqrt(hidden)),
    torch.nn.Linear's default (mergekit-moe's `uniform_random`); `zeros`: uniform routing."""

    init: Literal["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random", "zeros"] = "random"
    prompts: Optional[list[list[str]]] = None
    """One list of prompts per expert (hidden, hidden_avg, cheap_embed), then one for a gated shared expert."""
    negative: Optional[list[list[str]]] = None
    seed: Int = 0
    std: Float = Field(default=0.02, ge=0)
    draw: Literal["per_layer", "whole"] = "per_layer"
    """How random rows are drawn: `per_layer`, a stream per layer from (seed, layer); `whole`, one draw of the
    whole (layers, experts, hidden) block from torch.Generator().manual_seed(seed), which is what
    mergekit-moe draws after `--random-seed seed` (so its random and uniform_random gates are reproduced)."""

    @model_validator(mode="after")
    def _prompts(self):
        given = [p for lists in (self.prompts or [], self.negative or []) for prompts in lists for p in prompts]
        if len(given) > MAX_PROMPTS:
            raise ValueError(f"{len(given)} prompts; a router takes at most {MAX_PROMPTS} (the build runs the model "
                             "once per prompt)")
        longest = max(map(len, given), default=0)
        if longest > MAX_PROMPT_CHARS:
            raise ValueError(f"a prompt of {longest} characters; a router takes prompts of at most "
                             f"{MAX_PROMPT_CHARS} characters")
        if self.init in ("hidden", "hidden_avg", "cheap_embed"):
            if not self.prompts or any(not p for p in self.prompts):
                raise ValueError(f"the {self.init} router needs a non-empty list of prompts for every expert")
            if self.negative is not None and len(self.negative) != len(self.prompts):
                raise ValueError(f"negative has {len(self.negative)} lists for {len(self.prompts)} experts")
        return self


class MoESpec(_Node):
    """A mixture-of-experts model made from dense ones (see compose.moe for the three kinds).

    `upcycle`: every FFN copied into `num_experts` experts (Mixtral sparse upcycling). `from_experts`:
    attention, norms and embeddings from `model` (the base), expert e of each layer from `experts[e]`'s
    FFN (mergekit-moe). `fine_grained`: DeepSeekMoE, each FFN cut into `segments` experts of 1/segments
    the width, `routed` routed copies and `shared` always-on experts.
    """

    op: Literal["moe"] = "moe"
    kind: Literal["upcycle", "from_experts", "fine_grained"]
    model: "ModelSpec"
    experts: Optional[list["ModelSpec"]] = None
    num_experts: Optional[PositiveInt] = None
    segments: PositiveInt = 1
    routed: Optional[PositiveInt] = None
    shared: NonNegativeInt = 0
    preserve: Bool = False
    top_k: PositiveInt = 2
    router: RouterSpec = Field(default_factory=RouterSpec)
    layers: Optional[list[NonNegativeInt]] = None
    """Which layers become MoE (default: all, after `first_k_dense`, every `every`-th)."""
    every: PositiveInt = 1
    """Every k-th layer (1-based, as Qwen2-MoE's decoder_sparse_step: layers k-1, 2k-1, ...)."""
    first_k_dense: NonNegativeInt = 0
    noise: Float = Field(default=0.0, ge=0)
    """Std of seeded Gaussian noise added to each expert copy's weights (breaks the symmetry of copies)."""
    shared_expert: Optional["ModelSpec"] = None
    """from_experts: this model's FFN (full width) as a shared expert in every MoE layer (mergekit-moe's
    `shared_experts`): always on, or gated by sigmoid(x . row) with `shared_gate`."""
    shared_gate: Bool = False
    """from_experts: gate the shared expert with one more router row (from its prompts, the router's last
    list, or drawn with the others), as Qwen2-MoE's shared_expert_gate."""
    expert_noise: Optional[list[Annotated[Float, Field(ge=0)]]] = None
    """from_experts: per expert (the shared expert last), the std of its seeded noise (overrides `noise`)."""
    residual_scale: Optional[list[Float]] = None
    """from_experts: per expert (the shared expert last), a factor on its down projection, applied after the
    noise (mergekit-moe's `residual_scale`)."""
    seed: Int = 0
    norm_topk_prob: Bool = True
    jitter: Float = Field(default=0.0, ge=0)
    aux_loss_coef: Float = Field(default=0.001, ge=0)

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.kind == "upcycle" and self.num_experts is None:
            raise ValueError("upcycle needs num_experts")
        if self.kind == "from_experts" and not self.experts:
            raise ValueError("from_experts needs a non-empty list of experts")
        if self.kind == "fine_grained" and self.routed is None:
            raise ValueError("fine_grained needs routed (the number of routed experts)")
        if self.kind != "from_experts" and self.experts:
            raise ValueError(f"experts belongs to from_experts, not {self.kind}")
        per_expert = {"shared_expert": self.shared_expert, "shared_gate": self.shared_gate or None,
                      "expert_noise": self.expert_noise, "residual_scale": self.residual_scale}
        if self.kind != "from_experts" and any(v is not None for v in per_expert.values()):
            name = next(k for k, v in per_expert.items() if v is not None)
            raise ValueError(f"{name} belongs to from_experts, not {self.kind}")
        if self.shared_gate and self.shared_expert is None:
            raise ValueError("shared_gate needs a shared_expert")
        if self.kind == "from_experts":
            n = len(self.experts) + (self.shared_expert is not None)
            for name in ("expert_noise", "residual_scale"):
                v = getattr(self, name)
                if v is not None and len(v) != n:
                    raise ValueError(f"{name}: {len(v)} values for {n} experts (the shared expert last)")
        return self


class CalmSpec(_Node):
    """CALM (Bansal et al., 2024): the anchor model cross-attends to the augmenting model's hidden states.

    A cross-attention layer after anchor layer i reads augmenting layer j's output for every pair (i, j):
    `pairs` (0-based), or by default lucidrains/CALM-pytorch's rule for `every` (augmenting layers
    0, every, 2*every, ... spread evenly over the anchor's layers). Both models stay frozen.
    """

    op: Literal["calm"] = "calm"
    anchor: "ModelSpec"
    augment: "ModelSpec"
    every: PositiveInt = 4
    pairs: Optional[list[tuple[NonNegativeInt, NonNegativeInt]]] = None
    """(anchor_layer, augment_layer) pairs; overrides `every`."""
    heads: Optional[PositiveInt] = None
    """Cross-attention heads (default: the anchor's attention heads)."""
    seed: Int = 0
    """Seeds the new projections' initial weights."""
    std: Float = Field(default=0.02, gt=0)


class VisualExpertSpec(_Node):
    """CogVLM's visual expert (Wang et al., 2023): every layer gets vision QKV, output projection and FFN
    copied from the language weights, used for image tokens only; image features of `vision_width` come
    in through a two-layer MLP adapter. Only the visual experts and the adapter train."""

    op: Literal["visual_expert"] = "visual_expert"
    model: "ModelSpec"
    vision_width: PositiveInt
    seed: Int = 0
    """Seeds the adapter's initial weights."""
    std: Float = Field(default=0.02, gt=0)


ModelSpec = Annotated[Union[LoadSpec, ExpandSpec, UpscaleSpec, LayersSpec, StackSpec, MergeSpec, MoESpec, CalmSpec,
                            VisualExpertSpec],
                      Field(discriminator="op")]

for _cls in (ExpandSpec, UpscaleSpec, LayersSpec, StackSpec, MergeInput, MergeSpec, MoESpec, CalmSpec,
             VisualExpertSpec):
    _cls.model_rebuild()


class BuildSpec(_Node):
    """A whole spec file: the model to build (YAML/JSON specs have exactly this shape)."""

    version: Annotated[Literal[1], _refuse_bool("an integer")] = 1
    model: ModelSpec


def describe_validation_error(e: ValidationError, root: str) -> str:
    """One sentence naming the field: `model.groups: Input should be greater than 0`."""
    errors = e.errors()
    # A value that fits no branch of a union fails once per branch; a non-finite number is the one to name.
    err = next((x for x in errors if x["type"] == "finite_number"), errors[0])
    loc = ([root] if root else []) + [f"[{p}]" if isinstance(p, int) else str(p)
                                      for p in err["loc"] if p not in _OP_TAGS and not _union_branch(p)]
    path = ".".join(loc).replace(".[", "[") or "spec"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "nested_field":  # the message starts with the path below the node that raised it
        return f"{path}.{msg}" if loc else msg
    if err["type"] == "finite_number":
        msg = f"must be a finite number, got {err['input']!r}"
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    return f"{path}: {msg}"


def _union_branch(p) -> bool:
    """pydantic's name for a branch of a union in an error's location (`float`, `dict[str,...]`)."""
    return isinstance(p, str) and (p in ("bool", "int", "float", "str") or "[" in p)


_OP_TAGS = {"load", "expand_blocks", "depth_upscale", "layers", "stack", "merge", "moe", "calm", "visual_expert"}


def parse_build_spec(data: object, origin: str) -> BuildSpec:
    try:
        return BuildSpec.model_validate(data)
    except ValidationError as e:
        raise SpecError(f"{origin}: {describe_validation_error(e, '')}") from None
