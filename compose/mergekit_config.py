"""mergekit YAML configs as specs: `compose build merge.yml` accepts a mergekit config as it is.

A config with `models` becomes one `merge` of whole models; one with `slices` becomes a `stack` of
merges, one per output slice, each over `layers(model, *layer_range)` of its sources (so gradients run
over the slice's layers, and the embeddings come from the first slice, norm and head from the last, as
in mergekit). Parameters keep mergekit's precedence: a source's own, then its slice's, then the global
ones. Keys compose does not handle yet are refused by name rather than silently ignored.
"""
from __future__ import annotations

from compose.errors import SpecError

SUPPORTED = {"models", "slices", "merge_method", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source"}
NOT_YET = {"modules": "per-module configs", "tokenizer": "the `tokenizer:` block (use tokenizer_source)",
           "chat_template": "chat templates"}
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16", "half": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


def is_mergekit_config(data: object) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _ref(value, where: str) -> str:
    """A model reference as compose writes it: a path or hub id, `model+lora` for a LoRA folded in at load
    (mergekit's string form, or its {model: {path}, lora: {path}} mapping)."""
    if isinstance(value, dict) and set(value) <= {"model", "lora"} and isinstance(value.get("model"), dict):
        lora = value.get("lora")
        model = _path(value["model"], where)
        return model if lora is None else f"{model}+{_path(lora, f'{where}.lora')}"
    value = _path(value, where)
    if value.count("+") > 1 or "" in value.split("+"):
        from compose.lower.load import exists, readings

        if not any("+" in m and exists(m) for m, _ in readings(value)):  # else a folder's name holds a `+`
            raise SpecError(f"{where}: {value!r} is not `model` or `model+lora`")
    return value


def _path(value, where: str) -> str:
    if isinstance(value, dict):
        if set(value) - {"path", "revision"}:
            raise SpecError(f"{where}: unsupported model reference keys {sorted(set(value) - {'path', 'revision'})}")
        if value.get("revision"):
            raise SpecError(f"{where}: model revisions are not supported yet")
        value = value.get("path")
    if not isinstance(value, str) or not value:
        raise SpecError(f"{where}: expected a model path or hub id")
    return value


def _dtype(value, where: str) -> str | None:
    if value is None:
        return None
    if value not in DTYPES:
        raise SpecError(f"{where}: unsupported dtype {value!r} (use float32, bfloat16 or float16)")
    return DTYPES[value]


def _params(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a mapping of parameter names to values")
    return value


def _uses_base(method: str, origin: str) -> bool:
    from compose.merges.registry import get

    return get(method, f"{origin}: merge_method").base != "ignored"


def translate(data: dict, origin: str) -> dict:
    """A mergekit config -> the `model` of a compose BuildSpec (as plain data, validated by the caller)."""
    for key in data:
        if key in NOT_YET:
            raise SpecError(f"{origin}: {key}: {NOT_YET[key]} are not supported yet")
        if key not in SUPPORTED:
            raise SpecError(f"{origin}: {key}: not a mergekit config key compose knows")
    if bool(data.get("models")) == bool(data.get("slices")):
        raise SpecError(f"{origin}: give exactly one of models and slices")
    for key in ("models", "slices"):
        if data.get(key) and not isinstance(data[key], list):
            raise SpecError(f"{origin}: {key}: expected a list")
    method = data["merge_method"]
    base_ref = _ref(data["base_model"], f"{origin}: base_model") if data.get("base_model") else None
    dtype = _dtype(data.get("dtype"), f"{origin}: dtype")
    out_dtype = _dtype(data.get("out_dtype"), f"{origin}: out_dtype")
    ts = data.get("tokenizer_source")
    if ts is not None and ts not in ("base", "union"):
        ts = _ref(ts, f"{origin}: tokenizer_source")
    glob = _params(data.get("parameters"), f"{origin}: parameters")
    common = dict(method=method, seed=0, dtype=dtype, out_dtype=out_dtype, tokenizer_source=ts)

    if data.get("models"):
        inputs = []
        for i, m in enumerate(data["models"]):
            where = f"{origin}: models[{i}]"
            if not isinstance(m, dict) or "model" not in m:
                raise SpecError(f"{where}: expected {{model: ..., parameters: ...}}")
            if set(m) - {"model", "parameters"}:
                raise SpecError(f"{where}: unknown key {sorted(set(m) - {'model', 'parameters'})[0]}")
            inputs.append({"model": {"op": "load", "ref": _ref(m["model"], where)},
                           "parameters": _params(m.get("parameters"), f"{where}.parameters")})
        base = {"op": "load", "ref": base_ref} if base_ref else None
        return {"op": "merge", "models": inputs, "base": base, "parameters": glob, **common}

    slices, merged = [], set()
    for j, s in enumerate(data["slices"]):
        where = f"{origin}: slices[{j}]"
        if not isinstance(s, dict) or not isinstance(s.get("sources"), list):
            raise SpecError(f"{where}: expected {{sources: [...]}}")
        extra = set(s) - {"sources", "base_model", "parameters"}
        if extra:
            raise SpecError(f"{where}: {sorted(extra)[0]}: not supported")
        slice_base = _ref(s["base_model"], f"{where}.base_model") if s.get("base_model") else base_ref
        inputs, base = [], None
        for i, src in enumerate(s["sources"]):
            swhere = f"{where}.sources[{i}]"
            if not isinstance(src, dict):
                raise SpecError(f"{swhere}: expected {{model: ..., layer_range: [start, stop]}}")
            if set(src) - {"model", "layer_range", "parameters"}:
                raise SpecError(f"{swhere}: unknown key {sorted(set(src) - {'model', 'layer_range', 'parameters'})[0]}")
            ref = _ref(src.get("model"), f"{swhere}.model")
            lr = src.get("layer_range")
            if not (isinstance(lr, list) and len(lr) == 2 and all(type(x) is int for x in lr)):  # bool is no int
                raise SpecError(f"{swhere}.layer_range: expected [start, stop]")
            spec = {"op": "layers", "model": {"op": "load", "ref": ref}, "start": lr[0], "stop": lr[1]}
            inputs.append({"model": spec, "parameters": _params(src.get("parameters"), f"{swhere}.parameters")})
            if slice_base is not None and ref == slice_base and base is None:
                base = spec
        if slice_base is not None and base is None and _uses_base(method, origin):
            raise SpecError(f"{where}: base_model {slice_base} is not among this slice's sources")
        merged.add((tuple(i["model"]["model"]["ref"] for i in inputs), slice_base, base is not None))
        layers = [_params(s.get("parameters"), f"{where}.parameters"), glob]
        slices.append({"op": "merge", "models": inputs, "base": base, "parameters": layers, **common})
    if ts is not None and (len(merged) > 1 or any(b != base_ref or (b is not None and not has)
                                                  for _, b, has in merged)):
        # mergekit builds one vocabulary from every model of the config; compose remaps per merged slice,
        # which is the same only when every slice merges the same models around the same base.
        raise SpecError(f"{origin}: tokenizer_source: with slices, every slice must merge the same models in "
                        "the same order (the base among them) for now")
    return {"op": "stack", "slices": slices}
