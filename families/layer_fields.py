"""The config.json fields that say something of each decoder layer, and how each follows a new layer order.

transformers' config classes describe a model's layers in a few ways; each way is a kind here:

- `list`: one entry per layer (`layer_types`, `mlp_layer_types`, `no_rope_layers`);
- `indices`: the indices of the layers that are different (`mlp_only_layers`, `moe_layers`);
- `prefix`: the count of leading layers that are different (`first_k_dense_replace`: dense ones);
- `suffix`: the count of trailing layers that are different (`num_kv_shared_layers`);
- `upto`: the index of the last layer that is different (`moe_layer_end_index`);
- `by_index`: a mapping from layer indices to what is different about them (transformers' heterogeneous
  configs: `per_layer_config`, Gemma 4's full-attention head sizes);
- `step`: every step-th layer is different ((i + 1) % step == 0: `decoder_sparse_step`,
  `full_attention_interval`). A step usually generates a list the config class fills in (layer_types);
  where it is read by the modeling code itself (a sparse step), the layer's shapes say so.

What a layer is under these fields (each field's value for it) travels with the layer through every op, and
the output's fields are written from the new order; a field that cannot say the new order (a prefix whose
layers are no longer leading) is refused, naming the field and the layers. A field about layers that compose
does not know is reported, and ops that change the layers are refused for that model while merges still work.
"""
from __future__ import annotations

import json
import re

KINDS: dict[str, str] = {
    "mlp_only_layers": "indices", "moe_layers": "indices", "full_attn_idxs": "indices",
    "hybrid_layer_ids": "indices",
    "first_k_dense_replace": "prefix", "num_dense_layers": "prefix", "moe_layer_start_index": "prefix",
    "moe_layer_end_index": "upto", "moe_layer_interval": "step", "per_layer_config": "by_index",
    "num_kv_shared_layers": "suffix",
    "decoder_sparse_step": "step", "interleave_moe_layer_step": "step", "full_attention_interval": "step",
    "no_rope_layer_interval": "step", "sliding_window_pattern": "step", "_sliding_window_pattern": "step",
    "global_attn_every_n_layers": "step",
}
"""transformers' per-layer config fields that are not one value per layer, by kind."""

OUTER: dict[str, str] = {"vision_config.deepstack_visual_indexes": "feeds"}
"""Fields outside the decoder config that pick decoder layers, by their path in config.json: Qwen3-VL's
DeepStack adds the vision tower's features at `deepstack_visual_indexes` to the first len(...) decoder layers
(`feeds`: those layers must stay the leading ones, since the vision side fixes how many there are)."""

NOT_PER_LAYER = frozenset({
    "num_hidden_layers", "num_nextn_predict_layers", "hidden_size_per_layer_input", "vocab_size_per_layer_input",
    "max_window_layers", "use_sliding_window", "num_layers",
})
"""Fields whose names speak of layers but that do not pick layers out: counts of weights that are not in the
decoder stack (MTP layers), sizes, and fields transformers ignores once layer_types is set (max_window_layers:
Qwen2's layer_types is filled from it)."""

_ABOUT_LAYERS = re.compile(r"layer|interval|_step$|pattern")


def find(config: dict, n: int) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(field, kind) for every per-layer field of a decoder config `config` (a dict of its values, after the
    config class filled in what it derives) with `n` layers; and the fields that seem to be about layers
    but that compose cannot follow."""
    fields, unknown = [], []
    for k, v in config.items():
        kind = KINDS.get(k)
        if k in NOT_PER_LAYER or v is None or isinstance(v, bool) or (isinstance(v, dict) and kind is None):
            continue
        if kind is None and isinstance(v, list) and len(v) == n:
            kind = "list"
        if kind is not None:
            fields.append((k, kind))
        elif _ABOUT_LAYERS.search(k) and isinstance(v, (int, list)):
            unknown.append(k)
    return tuple(fields), tuple(unknown)


def find_outer(config: dict) -> tuple[tuple[str, str], ...]:
    """(path, kind) of the OUTER fields that config.json `config` (the whole of it, as a dict) has."""
    return tuple((path, kind) for path, kind in OUTER.items() if isinstance(get(config, path), list))


def get(config: dict, path: str):
    """The value at a dotted path of config.json (None where it is absent)."""
    for key in path.split("."):
        config = config.get(key) if isinstance(config, dict) else None
    return config


def value(kind: str, v, i: int, n: int):
    """What field value `v` of `kind` says of layer i of n."""
    if kind == "list":
        return v[i]
    if kind == "indices":
        return i in v
    if kind == "prefix":
        return i < v
    if kind == "suffix":
        return i >= n - v
    if kind == "upto":
        return i <= v
    if kind == "by_index":  # keys are indices as text, zero-padded by transformers past 9 layers ("05")
        return next((x for k, x in v.items() if str(k).isdigit() and int(k) == i), None)
    if kind == "feeds":
        return i < len(v)
    return (i + 1) % v == 0 if v > 0 else False


def values(config: dict, fields, n: int, whole: dict | None = None) -> tuple[tuple[tuple[str, str], ...], ...]:
    """Per layer: (field, its value for the layer as JSON text), for every field but the steps (a step only
    generates what the others, or the layer's shapes, already say). Dotted fields are read from `whole`, the
    whole config.json."""
    def of(k: str):
        return get(whole, k) if "." in k else config[k]

    return tuple(tuple((k, json.dumps(value(kind, of(k), i, n), sort_keys=True)) for k, kind in fields
                       if kind != "step") for i in range(n))


def rewrite(field: str, kind: str, old, said: list) -> object:
    """The value of `field` that says `said` (each new layer's value, decoded) in the new order; a ValueError
    naming the layers where it cannot."""
    n = len(said)
    if kind == "list":
        return list(said)
    if kind == "indices":
        return [i for i, v in enumerate(said) if v]
    if kind == "by_index":
        return {str(i): v for i, v in enumerate(said) if v is not None}
    if kind == "feeds":
        if list(said) != [i < len(old) for i in range(n)]:
            raise ValueError(f"config.json {field} feeds the vision tower's features into the first {len(old)} "
                             f"layers, but the new order puts the layers that take them at "
                             f"{[i for i, v in enumerate(said) if v]} of {n}")
        return old
    if kind in ("prefix", "suffix", "upto"):
        k = sum(1 for v in said if v)
        want = [i >= n - k for i in range(n)] if kind == "suffix" else [i < k for i in range(n)]
        if list(said) != want:
            where = "trailing" if kind == "suffix" else "leading"
            raise ValueError(f"config.json {field} counts {where} layers, but the new order puts its layers at "
                             f"{[i for i, v in enumerate(said) if v]} of {n}")
        return k - 1 if kind == "upto" else k
    # A step: kept while every step-th layer is still what it said, else the first step that says the new
    # order; otherwise left as it was (it then only generated what the other fields now say).
    for s in [old] + list(range(1, n + 1)):
        if isinstance(s, int) and s > 0 and all(value("step", s, i, n) == v for i, v in enumerate(said)):
            return s
    return old


def steps_said(config: dict, fields, n: int) -> dict[str, list]:
    """For each step field, what it says of each of the n layers (rewrite's `said` for a step)."""
    return {k: [value("step", config[k], i, n) for i in range(n)] for k, kind in fields
            if kind == "step" and isinstance(config.get(k), int)}
