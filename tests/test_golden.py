"""Golden IR dumps (`compose inspect`) for the example specs, compared line by line.

Regenerate with COMPOSE_UPDATE_GOLDEN=1 after a deliberate change, and read the diff before committing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from compose.cli import main

ROOT = Path(__file__).parents[1]
GOLDEN = Path(__file__).parent / "golden"


@pytest.mark.parametrize("name,args", [
    ("llama_pro", []),
    ("solar", []),
    ("passthrough", ["--after", "lower"]),
    ("passthrough", []),
    ("moe_upcycle", []),
    ("deepseek_moe", []),
    ("deepseek_moe", ["--after", "target"]),
    ("calm", []),
    ("cogvlm", []),
    ("qwen3_llama_pro", []),
    ("gemma3_solar", []),
    ("gemma2_moe", ["--after", "target"]),
    # One dump per fusion-stage pass: what each one decides, in the order the pipeline runs them.
    ("llama_pro", ["--after", "cse"]),
    ("llama_pro", ["--after", "fuse-qkv"]),
    ("qwen3_llama_pro", ["--after", "fuse-gate-up"]),
    ("moe_upcycle", ["--after", "stack-experts"]),
])
def test_inspect_matches_golden(name, args, capsys):
    assert main(["inspect", str(ROOT / "specs" / f"{name}.py"), *args]) == 0
    text = capsys.readouterr().out
    golden = GOLDEN / f"{name}{'.' + args[1] if args else ''}.txt"
    if os.environ.get("COMPOSE_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


@pytest.mark.parametrize("name", ["llama_pro", "solar"])
def test_yaml_spec_lowers_to_the_same_ir_as_python(name, capsys):
    main(["inspect", str(ROOT / "specs" / f"{name}.py")])
    py = capsys.readouterr().out
    main(["inspect", str(ROOT / "specs" / f"{name}.yaml")])
    assert capsys.readouterr().out == py
