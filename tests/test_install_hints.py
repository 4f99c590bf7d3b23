"""Install hints name this distribution, `compose-llm` (on the package index, `compose` is an unrelated
package that a hint naming it would install), with extras that pyproject.toml declares."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

from compose.errors import DISTRIBUTION, install_hint

ROOT = Path(__file__).parents[1]
HINT = re.compile(r"pip install (?:-e )?'([\w.-]+)\[(\w+)\]'")


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_hint_names_the_distribution_and_a_declared_extra():
    assert DISTRIBUTION == project()["name"]
    for extra in ("onnx", "gguf"):
        assert extra in project()["optional-dependencies"]
        assert install_hint(extra) == f"pip install '{DISTRIBUTION}[{extra}]'"


def test_every_hint_in_code_and_docs_installs_compose_llm():
    files = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    hints = [(f, m[1], m[2]) for f in files for m in HINT.finditer((ROOT / f).read_text(errors="replace"))]
    assert hints  # the README's gguf hint, at least
    extras = project()["optional-dependencies"]
    for f, dist, extra in hints:
        assert dist in (DISTRIBUTION, "."), f"{f}: pip install '{dist}[{extra}]'"
        assert extra in extras, f"{f}: extra {extra!r} is not in pyproject.toml"
