"""Peak memory of `compose build` against the size of the model it writes.

Writes a Llama-shaped source model of about 0.8 GB (fp32) to a temporary folder, then times
`compose build` of a SOLAR up-scale of it (1.2 GB out) and a LLaMA-Pro expansion, each as a whole
command, and prints peak RSS next to the output size. Streaming means the ratio stays well under 1:
memory holds a few tensors (plus torch and transformers themselves), not the model.

    python bench/stream_memory.py [--hidden 1024 --layers 8 --vocab 32000]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one command, measured by GNU time."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    return wall, int(r.stderr.strip().splitlines()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    tiny = (f"tiny:llama?hidden={a.hidden}&intermediate={4 * a.hidden}&heads=16&kv_heads=4"
            f"&layers={a.layers}&vocab={a.vocab}")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "src.py").write_text(f"from compose import load\nmodel = load({tiny!r})\n")
        compose = [sys.executable, "-m", "compose", "build", "--no-progress"]
        subprocess.run(compose + [str(root / "src.py"), "-o", str(root / "src")], check=True, stdout=subprocess.DEVNULL)
        specs = {
            "baseline: python -c 'import torch'": None,
            "solar drop=2": f"depth_upscale(load({str(root / 'src')!r}), drop=2)",
            "llama_pro groups=4": f"expand_blocks(load({str(root / 'src')!r}), groups=4)",
        }
        print(f"{'build':<36}{'wall s':>8}{'peak RSS MB':>13}{'output MB':>11}{'RSS/output':>12}")
        for name, expr in specs.items():
            if expr is None:
                wall, peak = run([sys.executable, "-c", "import torch, safetensors"])
                print(f"{name:<36}{wall:>8.2f}{peak / 1e6:>13.0f}{'-':>11}{'-':>12}")
                continue
            spec = root / f"{name.split()[0]}.py"
            spec.write_text(f"from compose import load, depth_upscale, expand_blocks\nmodel = {expr}\n")
            out = root / name.split()[0]
            wall, peak = run(compose + [str(spec), "-o", str(out)])
            size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
            print(f"{name:<36}{wall:>8.2f}{peak / 1e6:>13.0f}{size / 1e6:>11.0f}{peak / size:>12.2f}")


if __name__ == "__main__":
    main()
