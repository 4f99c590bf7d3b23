"""Bounded inputs: what a hostile adapter or config can make compose do is bounded. An adapter's regex
patterns are matched at a bounded cost (a catastrophically backtracking rank_pattern is refused, not run);
a folder whose name holds a `+` loads, and a reference that reads two ways is refused; router prompts are
bounded in number and length, and `compose inspect` never runs the model to compute router rows."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import save_hf_model
from test_limits import cli, one_line
from test_lora import _edit_config, make_adapter

from compose.cli import main
from compose.errors import SourceError
from compose.lora import MATCH_STEPS, PATTERN_CHARS, ModulePatterns

HANGS = "(.*)*!"
"""A nested quantifier: Python's re takes 2^n steps to find that a module name of n characters does not
end in `!` (with the module names of a Llama, it never returns)."""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounded")
    base = save_hf_model(root / "base", "llama", layers=2)
    return root, base, make_adapter(base, root / "ad", r=4, lora_alpha=8, target_modules=["q_proj"])


def spec_file(folder: Path, ref: str) -> Path:
    p = folder / "spec.py"
    p.write_text(f"from compose import load\nmodel = load({ref!r})\n")
    return p


# -- regex patterns from adapters --------------------------------------------------------------------------

@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
@pytest.mark.parametrize("command", ["inspect", "build"])
def test_a_backtracking_pattern_is_refused_not_run(folders, tmp_path, field, command):
    _, base, adapter = folders
    hostile = Path(shutil.copytree(adapter, tmp_path / "ad"))
    _edit_config(hostile, **{field: {HANGS: 8}})
    before = sorted(p.name for p in hostile.iterdir())
    spec = spec_file(tmp_path, f"{base}+{hostile}")
    args = ["-o", str(tmp_path / "out")] if command == "build" else []
    line = one_line(cli(command, str(spec), *args, cwd=tmp_path, timeout=120))
    assert f"{field}['{HANGS}']: matching it against 'model.layers.0.self_attn.q_proj' could take over" in line
    assert "nested or chained quantifiers" in line
    assert not (tmp_path / "out").exists() and sorted(p.name for p in hostile.iterdir()) == before


NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.10.mlp.up_proj", "lm_head", "q_proj", ".q_proj",
         "model..q_proj", "a.b\nc.q_proj", "x.q_proj\n", "model.embed_tokens"]
PATTERNS = ["q_proj", "layers.1.mlp.up_proj", r"layers\.1\d\..*", "^model.*", r"\Aq_proj", "model", ".*proj",
            "(q|k|v)_proj", r"\bq_proj", "(?i:Q_PROJ)", "up_proj$", "", r"(?=.*mlp).*", r"[^.]+_proj", "c.q_proj",
            r"\w+", "x.q_proj", r"\.q_proj", "(?:a|b)*", "(?P<name>q)_proj", r"model\.layers\.0\.self_attn\.q_proj"]


def test_patterns_mean_what_they_mean_to_peft():
    """The bounded matcher gives re's own answers: PEFT's rule for adapter keys, re.search for CLI flags."""
    for p in PATTERNS:
        peft = ModulePatterns([p], "f", repr, peft=True)
        search = ModulePatterns([p], "f", repr, peft=False)
        for n in NAMES:
            assert (peft.first(n) == 0) == bool(re.match(rf"(.*\.)?({p})$", n)), (p, n)
            assert (search.first(n) == 0) == bool(re.search(p, n)), (p, n)
    keys = ModulePatterns(["v_proj", "q_proj", ".*"], "f", repr, peft=True)  # the first that matches wins
    assert [keys.first(n) for n in ("a.q_proj", "a.v_proj", "a.k_proj")] == [1, 0, 2]


@pytest.mark.parametrize("pattern,said", [
    (HANGS, "could take over"), ("(a|a)" * 40, "could take over"), (".*" * 20 + "x", "could take over"),
    (r"(\w+\.?)+$", "could take over"), ("((a{1000}){1000}){1000}", "could take over"),
    (r"(a)\1", "a back reference is not supported"), ("(a)?(?(1)b|c)", "a conditional group is not supported"),
    ("x" * (PATTERN_CHARS + 1), "compose takes at most 1024"),
    ("(?i)q_proj", "is not a valid pattern"), ("a)|(b", "is not a valid pattern"),
])
def test_costly_or_odd_patterns_are_refused_by_name(pattern, said):
    with pytest.raises(SourceError, match=re.escape(said)) as e:
        ModulePatterns([pattern], "f", lambda p: "f[key]", peft=True).first("model.layers.0.self_attn.q_proj")
    assert "f[key]" in str(e.value)


def test_many_cheap_patterns_stay_within_the_bound():
    """An adapter with one escaped key per module (what compose extract-lora writes) for a large model."""
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(80) for p in "qkvo"]
    keys = ModulePatterns([re.escape(n) for n in names], "f", repr, peft=True)
    assert [keys.first(n) for n in names] == list(range(len(names)))
    assert keys.spent < MATCH_STEPS / 10


# -- `+` in folder names -----------------------------------------------------------------------------------

def test_a_folder_whose_name_holds_a_plus_loads(folders, tmp_path, capsys, monkeypatch):
    model = save_hf_model(tmp_path / "my+model", "llama", layers=2)
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", str(spec_file(tmp_path, "my+model"))]) == 0
    out = capsys.readouterr().out
    assert f"source %0 = {model}" in out and "lora(" not in out
    # With an adapter: `my+model` + `ad`, the one reading whose parts exist.
    _, _, adapter = folders
    shutil.copytree(adapter, tmp_path / "ad")
    assert main(["inspect", str(spec_file(tmp_path, "my+model+ad"))]) == 0
    assert "self_attn.q_proj.weight <- lora(" in capsys.readouterr().out


def test_a_reference_that_reads_two_ways_is_refused(folders, tmp_path):
    """`my+model` with a folder of that name and a model `my` beside an adapter `model`: which one was meant
    is not guessed (before, the adapter was silently folded into `my`)."""
    _, base, adapter = folders
    save_hf_model(tmp_path / "my+model", "llama", layers=2)
    shutil.copytree(base, tmp_path / "my")
    shutil.copytree(adapter, tmp_path / "model")
    spec = spec_file(tmp_path, "my+model")
    before = sorted(p.name for p in tmp_path.iterdir())
    line = one_line(cli("build", str(spec), "-o", str(tmp_path / "out"), cwd=tmp_path))
    assert ("'my+model' is ambiguous: the folder 'my+model' or the model 'my' with the LoRA adapter 'model'"
            in line)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_mergekit_and_dsl_references_take_a_plus_folder(folders, tmp_path):
    from compose import load
    from compose.mergekit_config import translate

    _, _, adapter = folders
    model = save_hf_model(tmp_path / "a+b", "llama", layers=2)
    cfg = {"merge_method": "linear", "models": [{"model": f"{model}+{adapter}", "parameters": {"weight": 1.0}}]}
    assert translate(cfg, "x.yml")["models"][0]["model"]["ref"] == f"{model}+{adapter}"
    assert load(str(model), lora=str(adapter)).ref == f"{model}+{adapter}"


# -- router prompts ----------------------------------------------------------------------------------------

def moe_config(**change) -> dict:
    return {"base_model": "tiny:llama?layers=2", "gate_mode": "hidden", **change,
            "experts": [{"source_model": "tiny:llama?layers=2&seed=1", "positive_prompts": ["def f(x):"]},
                        {"source_model": "tiny:llama?layers=2&seed=2", "positive_prompts": ["Once upon"]}]}


@pytest.mark.parametrize("prompts,said", [
    (["a prompt"] * 10_000, "experts[0].positive_prompts: 10000 prompts; compose takes at most 1024"),
    (["x" * 1_000_000], "experts[0].positive_prompts[0]: a prompt of 1000000 characters; compose takes at most 65536"),
])
@pytest.mark.parametrize("command", ["inspect", "build"])
def test_too_many_or_too_long_prompts_are_refused(tmp_path, prompts, said, command):
    config = moe_config()
    config["experts"][0]["positive_prompts"] = prompts
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config))
    args = ["-o", str(tmp_path / "out")] if command == "build" else []
    assert said in one_line(cli(command, str(tmp_path / "moe.yml"), *args, cwd=tmp_path, timeout=60))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.yml"]


def test_prompts_are_counted_over_all_experts(tmp_path, capsys):
    config = moe_config()
    for e in config["experts"]:
        e["positive_prompts"], e["negative_prompts"] = ["p"] * 300, ["n"] * 300
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(config))
    assert main(["inspect", str(tmp_path / "moe.yml")]) == 2
    assert "experts: 1200 prompts in all" in capsys.readouterr().err
    # compose's own spec form and the DSL: the router itself
    spec = {"model": {"op": "moe", "kind": "from_experts", "model": {"op": "load", "ref": "tiny:llama?layers=2"},
                      "experts": [{"op": "load", "ref": "tiny:llama?layers=2&seed=1"}] * 2,
                      "router": {"init": "hidden", "prompts": [["p"] * 1000, ["q"] * 25]}}}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert main(["inspect", str(tmp_path / "spec.json")]) == 2
    assert "1025 prompts; a router takes at most 1024" in capsys.readouterr().err


def test_inspect_does_not_run_the_model_and_build_runs_it_once(tmp_path, capsys, monkeypatch):
    from compose.lower import router

    (tmp_path / "moe.yml").write_text(yaml.safe_dump(moe_config()))

    def refuse(*a, **k):
        raise AssertionError("the model ran while lowering")
    monkeypatch.setattr(router, "gate_vectors", refuse)
    monkeypatch.setattr(router, "_transformers_model", refuse)
    assert main(["inspect", str(tmp_path / "moe.yml")]) == 0
    out = capsys.readouterr().out
    assert "const(hidden router layer 0, sha256=" in out and "const(hidden router layer 1, sha256=" in out
    monkeypatch.undo()

    calls = []
    real = router.gate_vectors
    monkeypatch.setattr(router, "gate_vectors", lambda *a: calls.append(1) or real(*a))
    assert main(["build", str(tmp_path / "moe.yml"), "-o", str(tmp_path / "out"), "--workers", "4"]) == 0
    assert calls == [1]  # every layer's rows from one run over the prompts, whichever thread asked first
