"""Smoke test of the small-scale experiments: each script runs with --quick, prints a markdown results
table and writes its PNG plot (here to a temporary folder via --png; by default experiments/<name>.png)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.mark.parametrize("name", ["llama_pro", "merging", "upcycling", "solar"])
def test_experiment_quick_run(name, tmp_path):
    script = EXPERIMENTS / f"{name}.py"
    png = tmp_path / f"{name}.png"          # not experiments/<name>.png: keep the full run's plot
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, str(script), "--quick", "--threads", "1", "--png", str(png)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=EXPERIMENTS.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(l.startswith("| model |") for l in lines), r.stdout
    assert sum(l.startswith("|") for l in lines) >= 4, r.stdout
    assert png.exists() and png.stat().st_size > 1000
