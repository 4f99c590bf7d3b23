"""llama.cpp against transformers on compose's `--format gguf` outputs: logits of every position, f32 KV cache.

    python bench/llama_cpp_check.py                 # build llama-cpp-python once (cached), then compare
    python bench/llama_cpp_check.py --install-only  # only the build (nice -n 19, 2 parallel jobs)

llama-cpp-python is built from source (PyPI ships only its sdist) with `pip install --target` into
~/.cache/compose-test/llama-cpp-python-<version> (tests/test_gguf.py imports it from there when it is
present, and skips its llama.cpp test otherwise). The build takes long on a small machine: about half an
hour on 2 cores, run at the lowest priority. Each tiny model is built by compose (hf + gguf), run by
transformers (float32) and by llama.cpp (one thread, K and V caches in F32), and the largest difference of
the logits is printed with the largest logit, the share of positions whose argmax agrees, and whether
llama.cpp's logits are all finite.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path.home() / ".cache" / "compose-test" / f"llama-cpp-python-{VERSION}"
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF")
"""Only the library: no multimodal helper, tools, tests or server, and no OpenMP runtime to ship."""


def install(cache: Path = CACHE) -> None:
    """pip install --target `cache` llama-cpp-python==VERSION, built from source, unless it is there."""
    if (cache / "llama_cpp").is_dir():
        return
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": "2", "CMAKE_ARGS": CMAKE_ARGS}
    cmd = ["nice", "-n", "19", sys.executable, "-m", "pip", "install", "--target", str(cache),
           f"llama-cpp-python=={VERSION}"]
    print("building:", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, env=env, check=True)


def import_llama_cpp(cache: Path = CACHE):
    if str(cache) not in sys.path:
        sys.path.append(str(cache))  # after the venv's site-packages: its numpy and jinja2 win
    import llama_cpp

    return llama_cpp


def _tests():
    """tests/test_gguf.py: its builds and its llama.cpp call, shared so the bench and the test cannot drift."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import test_gguf

    return test_gguf


def specs(root: Path) -> dict:
    """The builds tests/test_gguf.py checks against llama.cpp (some are made from checkpoints under root)."""
    return {name: spec(root) if callable(spec) else spec for name, spec in _tests()._builds().items()}


def llama_cpp_logits(llama_cpp, path: Path, ids: list[int]):
    return _tests().llama_cpp_logits(llama_cpp, path, ids)


def compare(llama_cpp, folder: Path, seq: int = 40) -> dict:
    import json

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits[0].float().numpy()
    have = llama_cpp_logits(llama_cpp, folder / "model.gguf", ids[0].tolist())
    arch = json.loads((folder / "compose.json").read_text()).get("target", {})
    return {"dtype": json.loads((folder / "config.json").read_text())["dtype"], "target": arch,
            "max_abs_diff": float(np.abs(have - want).max()), "max_abs_logit": float(np.abs(want).max()),
            "argmax_agree": float((have.argmax(-1) == want.argmax(-1)).mean()), "finite": bool(np.isfinite(have).all())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install-only", action="store_true")
    ap.add_argument("--seq", type=int, default=40)
    a = ap.parse_args()
    install()
    if a.install_only:
        return 0
    llama_cpp = import_llama_cpp()
    import gguf
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()

    from importlib.metadata import version

    from compose.pipeline import build

    print(f"llama-cpp-python {llama_cpp.__version__}, gguf {version('gguf')}")
    print(f"{'model':<42}{'arch':<10}{'dtype':<10}{'max|diff|':>11}{'max|logit|':>12}{'argmax':>8}{'finite':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, spec) in enumerate(specs(Path(tmp) / "sources").items()):
            out = build(spec, Path(tmp) / str(i), formats=["hf", "gguf"], progress=False, workers=1)
            r = gguf.GGUFReader(out / "model.gguf")
            arch = r.fields["general.architecture"].contents()
            c = compare(llama_cpp, out, a.seq)
            print(f"{name:<42}{arch:<10}{c['dtype']:<10}{c['max_abs_diff']:>11.2e}{c['max_abs_logit']:>12.3f}"
                  f"{c['argmax_agree']:>8.2f}{c['finite']!s:>8}")
        tokenization(llama_cpp, Path(tmp) / "tok")
    return 0


def tokenization(llama_cpp, root: Path) -> None:
    """llama.cpp's ids for tests/test_gguf.py's TEXT against transformers', for a tokenizer.json of each split
    compose names: with the pre-tokenizer compose writes, and with `default` (what it wrote before)."""
    from transformers import AutoTokenizer

    from compose import load
    from compose.pipeline import build

    t = _tests()
    print(f"\n{'pre-tokenizer':<16}{'tokens':>8}{'written: equal':>16}{'default: equal':>16}")
    for pre, make in t.PRE_TOKENIZERS.items():
        split, ignore_merges = make()
        src = t._byte_level_source(root / pre / "src", split, ignore_merges)
        out = build(load(str(src)), root / pre / "out", formats=["hf", "gguf"], progress=False)
        want = AutoTokenizer.from_pretrained(src).encode(t.TEXT, add_special_tokens=False)
        have = t.llama_cpp_tokens(llama_cpp, out / "model.gguf", t.TEXT)
        default = t.llama_cpp_tokens(llama_cpp, t.with_pre(out / "model.gguf", "default", root / pre / "d.gguf"),
                                     t.TEXT)
        print(f"{pre:<16}{len(want):>8}{str(have == want):>16}{str(default == want):>16}")


if __name__ == "__main__":
    sys.exit(main())
