"""The Python DSL: functions that return lazy composition objects (spec nodes); nothing runs until build."""
from __future__ import annotations

from pydantic import ValidationError

from compose.errors import SpecError
from compose.spec import CalmSpec, ExpandSpec, LayersSpec, LoadSpec, StackSpec, UpscaleSpec, VisualExpertSpec


def _make(cls, fn: str, **fields):
    try:
        return cls(**fields)
    except ValidationError as e:
        from compose.spec import describe_validation_error

        raise SpecError(describe_validation_error(e, fn)) from None


def load(ref: str, *, dtype: str | None = None, lora: str | None = None) -> LoadSpec:
    """A model: a local HF folder, a hub id (through the local HF cache), or a built-in `tiny:<name>` (the names
    are `compose.families.TINY`'s: one per hand-written family with a tiny recipe).
    `lora` (a PEFT adapter folder or hub id) is folded into its weights, as `load("model+adapter")` is:
    the spec holds mergekit's `model+adapter` form either way. A folder whose name holds a `+` is that
    folder; a reference that also reads as a model and an adapter is refused when it is built."""
    if lora is not None:
        from compose.lower.load import exists

        if not isinstance(lora, str) or not lora or ("+" in lora and not exists(lora)):
            raise SpecError(f"load.lora: expected one adapter path or hub id, got {lora!r}")
        if "+" in str(ref) and not exists(str(ref)):
            raise SpecError(f"load.lora: ref {ref!r} already names an adapter (`model+adapter`)")
        ref = f"{ref}+{lora}"
    return _make(LoadSpec, "load", ref=ref, dtype=dtype)


def expand_blocks(model, *, groups: int | None = None, per_group: int = 1,
                  positions: list[int] | None = None) -> ExpandSpec:
    """LLaMA-Pro block expansion: identity copies (zeroed o_proj/down_proj) after each group of layers."""
    return _make(ExpandSpec, "expand_blocks", model=model, groups=groups, per_group=per_group,
                 positions=positions)


def depth_upscale(model, *, drop: int) -> UpscaleSpec:
    """SOLAR depth up-scaling: n layers become 2*(n-drop): [0, n-drop) then [drop, n)."""
    return _make(UpscaleSpec, "depth_upscale", model=model, drop=drop)


def layers(model, start: int, stop: int) -> LayersSpec:
    """Layers [start, stop) of `model`, for `stack`."""
    return _make(LayersSpec, "layers", model=model, start=start, stop=stop)


def stack(*slices) -> StackSpec:
    """Stack slices (from one or several models of the same family and width) into one model."""
    return _make(StackSpec, "stack", slices=list(slices))


def calm(*, anchor, augment, every: int = 4, pairs: list[tuple[int, int]] | None = None, heads: int | None = None,
         seed: int = 0, std: float = 0.02) -> CalmSpec:
    """CALM: `anchor` cross-attends to `augment`'s hidden states after chosen layers; only the new
    cross-attention layers train. `pairs` are (anchor_layer, augment_layer), 0-based; by default every
    `every`-th augmenting layer is connected, spread evenly over the anchor (lucidrains/CALM-pytorch)."""
    return _make(CalmSpec, "calm", anchor=anchor, augment=augment, every=every, pairs=pairs, heads=heads,
                 seed=seed, std=std)


def visual_expert(model, *, vision_width: int, seed: int = 0, std: float = 0.02) -> VisualExpertSpec:
    """CogVLM's visual expert: per-layer vision QKV, output projection and FFN copied from the language
    weights, used for image tokens (chosen by token_type_ids); image features of width `vision_width`
    enter through a two-layer MLP adapter. Text-only input gives the base model's logits exactly."""
    return _make(VisualExpertSpec, "visual_expert", model=model, vision_width=vision_width, seed=seed, std=std)
