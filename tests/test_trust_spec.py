"""Spec strictness (issue 29): a spec that exits, a key given twice, a boolean where a number is asked (or
a number where a flag is), and extract-lora between two different architectures are refused with one line
naming the file, field or key, exit code 2, and no output folder."""
from __future__ import annotations

import typing
from pathlib import Path

import pytest
from conftest import save_hf_model

from compose.cli import main
from compose.pipeline import load_spec

A, B = "tiny:llama?layers=2", "tiny:llama?layers=2&seed=1"


def refused(capsys, tmp_path: Path, args: list[str], *needles: str) -> str:
    """`compose <args> -o tmp/out` exits 2 with one line naming every needle, and leaves no folder."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert main([*args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compose: error: "), err
    for n in needles:
        assert n in err[0], err[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if "compose-tmp" in p.name]
    return err[0]


def build_refused(capsys, tmp_path: Path, name: str, text: str, *needles: str) -> str:
    spec = tmp_path / name
    spec.write_text(text)
    return refused(capsys, tmp_path, ["build", str(spec)], *needles)


# -- a Python spec that exits --------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\n", "exit()\n", "raise SystemExit(3)\n"])
def test_a_spec_that_exits_is_an_error_not_a_success(capsys, tmp_path, code):
    line = code.count("\n")
    build_refused(capsys, tmp_path, "s.py", "from compose import load\n" + code + f"model = load({A!r})\n",
                  "s.py", f"line {line + 1}", "SystemExit")


def test_a_spec_interrupted_stays_an_interrupt(tmp_path):
    spec = tmp_path / "s.py"
    spec.write_text("raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_spec(spec)


# -- duplicate keys -----------------------------------------------------------------------------------------

MERGE_YAML = f"""model:
  op: merge
  method: linear
  models:
    - model: {{op: load, ref: "{A}"}}
      parameters: {{weight: 0.3}}
    - model: {{op: load, ref: "{B}"}}
      parameters:
        weight: 0.7
        weight: 0.1
"""

MERGEKIT_YAML = f"""merge_method: linear
models:
  - model: "{A}"
    parameters: {{weight: 0.5}}
  - model: "{B}"
    parameters: {{weight: 0.5}}
dtype: float32
dtype: bfloat16
"""


@pytest.mark.parametrize("name, text, key, line", [
    ("s.yaml", MERGE_YAML, "'weight'", 10),
    ("s.json", '{"model": {"op": "load",\n "ref": "%s",\n "ref": "%s"}}\n' % (A, B), "'ref'", 3),
    ("merge.yml", MERGEKIT_YAML, "'dtype'", 8),
    ("moe.yml", f"base_model: '{A}'\ngate_mode: random\nexperts:\n  - source_model: '{A}'\n"
                f"    source_model: '{B}'\n", "'source_model'", 5),
])
def test_a_key_given_twice_is_refused(capsys, tmp_path, name, text, key, line):
    build_refused(capsys, tmp_path, name, text, name, f"line {line}", f"duplicate key {key}")


def test_anchors_and_merge_keys_still_work(tmp_path):
    """`<<: *anchor` then an own key of the same name is YAML's override, not a duplicate."""
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""model:
  op: merge
  method: linear
  models:
    - model: &a {{op: load, ref: "{A}"}}
      parameters: &w {{weight: 0.5}}
    - model:
        <<: *a
        ref: "{B}"
      parameters: *w
""")
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"""model:
  op: merge
  method: linear
  models:
    - {{model: {{op: load, ref: "{A}"}}, parameters: {{weight: 0.5}}}}
    - {{model: {{op: load, ref: "{B}"}}, parameters: {{weight: 0.5}}}}
""")
    assert load_spec(spec) == load_spec(plain)


# -- booleans and numbers --------------------------------------------------------------------------------------

EXPAND = f"model:\n  op: expand_blocks\n  model: {{op: load, ref: '{A}'}}\n"
UPCYCLE = f"model:\n  op: moe\n  kind: upcycle\n  num_experts: 2\n  model: {{op: load, ref: '{A}'}}\n"


@pytest.mark.parametrize("text, needles", [
    (EXPAND + "  groups: true\n", ["model.groups: expected an integer, got a boolean"]),
    (EXPAND + "  positions: [0, false]\n", ["model.positions[1]: expected an integer, got a boolean"]),
    (f"version: true\nmodel: {{op: load, ref: '{A}'}}\n", ["version: expected an integer, got a boolean"]),
    (UPCYCLE + "  noise: true\n", ["model.noise: expected a number, got a boolean"]),
    (UPCYCLE + "  router: {init: random, std: true}\n", ["model.router.std: expected a number, got a boolean"]),
    (UPCYCLE + "  preserve: 1\n", ["model.preserve: expected true or false, got 1"]),
    # merge parameters: every value of a known parameter, the ones no tensor would read included
    (MERGE_YAML.replace("weight: 0.3", "weight: true").replace("        weight: 0.1\n", ""),
     ["model.models[0].parameters.weight", "must be a number, got True"]),
    (MERGE_YAML.replace("        weight: 0.1\n", "") + "  parameters: {weight: [0.5, true]}\n",
     ["model.parameters.weight[1]", "must be a number, got True"]),
    (MERGE_YAML.replace("        weight: 0.1\n", "") + "  parameters: {weight: [{filter: mlp, value: false}]}\n",
     ["model.parameters.weight[0].value", "must be a number, got False"]),
    (MERGE_YAML.replace("        weight: 0.1\n", "") + "  parameters: {normalize: 1}\n",
     ["model.parameters.normalize", "must be true or false, got 1"]),
])
def test_a_boolean_is_no_number_in_a_spec(capsys, tmp_path, text, needles):
    build_refused(capsys, tmp_path, "s.yaml", text, "s.yaml", *needles)


@pytest.mark.parametrize("edit, needles", [
    # the global weight is behind every model's own: no tensor reads it, and it is still refused
    (lambda t: t + "parameters: {weight: true}\n", ["parameters.weight", "must be a number, got True"]),
    (lambda t: t.replace("{weight: 0.5}", "{weight: false}", 1), ["models[0].parameters.weight", "got False"]),
    (lambda t: t + "parameters: {normalize: 0}\n", ["parameters.normalize", "must be true or false, got 0"]),
])
def test_a_boolean_is_no_number_in_a_mergekit_config(capsys, tmp_path, edit, needles):
    text = edit(MERGEKIT_YAML.replace("dtype: bfloat16\n", ""))
    build_refused(capsys, tmp_path, "merge.yml", text, "merge.yml", *needles)


def test_a_boolean_is_no_layer_in_a_mergekit_slice(capsys, tmp_path):
    text = f"merge_method: passthrough\nslices:\n  - sources:\n      - model: '{A}'\n        layer_range: [true, 2]\n"
    build_refused(capsys, tmp_path, "merge.yml", text, "slices[0].sources[0].layer_range")


@pytest.mark.parametrize("text, needles", [
    ("merge_method: passthrough\nslices:\n  - sources: [5]\n", ["slices[0].sources[0]: expected"]),
    ("merge_method: passthrough\nslices:\n  - sources: 5\n", ["slices[0]: expected {sources: [...]}"]),
    ("merge_method: linear\nmodels: 5\n", ["models: expected a list"]),
])
def test_a_mergekit_config_of_the_wrong_shape_is_named(capsys, tmp_path, text, needles):
    build_refused(capsys, tmp_path, "merge.yml", text, "merge.yml", *needles)


def test_every_number_and_flag_field_of_the_spec_is_strict():
    """The mechanism holds only if no field is a bare int, float or bool (which pydantic's lax mode fills
    from a boolean or a number): each must be spec.Int, Float, Bool or their constrained forms. Unions
    that list bool themselves (merge parameters' Scalar) take booleans on purpose."""
    from pydantic import BaseModel, BeforeValidator

    from compose import spec

    def strict(metadata) -> bool:
        return any(isinstance(m, BeforeValidator) for m in metadata)

    def bare(t) -> list:
        if t in (int, float, bool):
            return [t]
        args = typing.get_args(t)
        if typing.get_origin(t) is typing.Annotated:
            return [] if strict(t.__metadata__) else bare(args[0])
        if typing.get_origin(t) is typing.Union and bool in args:
            return []
        if isinstance(t, type) and issubclass(t, BaseModel):
            return []  # checked as a model of its own
        return [x for a in args for x in bare(a)]

    models = [m for m in vars(spec).values()
              if isinstance(m, type) and issubclass(m, spec._Node) and m is not spec._Node]
    assert len(models) > 10
    # pydantic keeps a field's own Annotated metadata beside its annotation
    fields = {f"{m.__name__}.{name}": f for m in models for name, f in m.model_fields.items()}
    assert not {k: bare(f.annotation) for k, f in fields.items() if not strict(f.metadata) and bare(f.annotation)}
    assert bare(typing.Optional[list[int]]) == [int] and bare(typing.Optional[list[spec.PositiveInt]]) == []
    assert {"MoESpec.preserve", "MoESpec.noise", "BuildSpec.version"} <= {k for k, f in fields.items()
                                                                          if strict(f.metadata)}


# -- extract-lora between two architectures --------------------------------------------------------------------

@pytest.fixture(scope="module")
def arches(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("arches")
    return {"mistral": save_hf_model(root / "mistral", "mistral", layers=2),  # sliding_window 16
            "llama": save_hf_model(root / "llama", "llama", layers=2, seed=1),
            "mistral_full": save_hf_model(root / "mistral_full", "mistral", layers=2, seed=2, sliding_window=None),
            "llama_theta": save_hf_model(root / "llama_theta", "llama", layers=2, seed=3,
                                         rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
            "llama_chat": save_hf_model(root / "llama_chat", "llama", layers=2, seed=4, eos_token_id=7,
                                        max_position_embeddings=128)}


@pytest.mark.parametrize("model, base, needles", [
    ("mistral", "llama", ["model_type", "'mistral' in the model, 'llama' in the base"]),
    ("mistral", "mistral_full", ["window", "16 in the model, None in the base"]),
    ("llama_theta", "llama", ["rope.theta", "500000.0 in the model, 10000.0 in the base"]),
])
def test_extract_lora_refuses_another_architecture(capsys, tmp_path, arches, model, base, needles):
    refused(capsys, tmp_path, ["extract-lora", "--model", str(arches[model]), "--base", str(arches[base]),
                               "--rank", "2"], *needles)


def test_extract_lora_takes_a_fine_tune_with_other_special_tokens_and_context(capsys, tmp_path, arches):
    """An instruct model often has its own eos and a shorter declared context: the tensors mean the same."""
    out = tmp_path / "out"
    assert main(["extract-lora", "--model", str(arches["llama_chat"]), "--base", str(arches["llama"]),
                 "--rank", "2", "-o", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file()
