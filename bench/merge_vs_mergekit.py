"""compose build vs mergekit-yaml on the same mergekit configs, as whole commands, in one run.

Generates three Llama-shaped models of about 100M parameters (fp32, ~400 MB each: a base and two
fine-tunes of it, base + noise) in a temporary folder, then for each method runs both tools on the same
YAML file several times and prints the median wall time and peak RSS (GNU time) of each and their
ratios. Targets (issue 3): wall <= 0.5x and peak RSS <= 1.0x mergekit's for every method.

    pip install -e '.[peer]'          # mergekit 0.1.5
    python bench/merge_vs_mergekit.py [--reps 3] [--hidden 640] [--layers 12]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

METHODS = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "base", "parameters": {"weight": 0.2}}, {"model": "a", "parameters": {"weight": 0.5}},
        {"model": "b", "parameters": {"weight": 0.3}}]},
    "slerp": {"merge_method": "slerp", "base_model": "a", "parameters": {"t": [0.2, 0.8]},
              "models": [{"model": "a"}, {"model": "b"}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 0.6}}, {"model": "b", "parameters": {"weight": 0.4}}]},
    "ties": {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 1.0, "density": 0.4}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.6}}]},
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": 1.0, "density": 0.4}},
        {"model": "b", "parameters": {"weight": 0.5, "density": 0.6}}]},
}


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of one whole command."""
    t = time.perf_counter()
    r = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return wall, int(r.stderr.strip().splitlines()[-1]) * 1024


def make_models(root: Path, hidden: int, layers: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    spec = root / "base.py"
    heads = hidden // 64
    spec.write_text("from compose import load\nmodel = load('tiny:llama?hidden=%d&intermediate=%d&heads=%d&kv_heads=%d"
                    "&layers=%d&vocab=32000')\n" % (hidden, hidden * 14 // 5, heads, heads, layers))
    subprocess.run([sys.executable, "-m", "compose", "build", str(spec), "-o", str(root / "base"), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)
    for i, name in enumerate(["a", "b"], 1):
        shutil.copytree(root / "base", root / name)
        g = torch.Generator().manual_seed(i)
        t = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in load_file(root / "base" / "model.safetensors").items()}
        save_file(t, root / name / "model.safetensors", metadata={"format": "pt"})
    n = sum(v.numel() for v in load_file(root / "base" / "model.safetensors").values())
    print(f"models: 3 x {n / 1e6:.0f}M parameters, "
          f"{(root / 'base' / 'model.safetensors').stat().st_size / 1e6:.0f} MB each (float32)\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=640)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--methods", default=",".join(METHODS))
    a = ap.parse_args()
    mergekit = Path(sys.executable).parent / "mergekit-yaml"
    if not mergekit.exists():
        sys.exit("mergekit-yaml not found: pip install -e '.[peer]'")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        make_models(root, a.hidden, a.layers)
        print(f"{'method':<17}{'compose s':>10}{'mergekit s':>11}{'wall x':>8}{'compose MB':>12}{'mergekit MB':>12}"
              f"{'RSS x':>7}")
        for name in a.methods.split(","):
            cfg = {**METHODS[name]}
            cfg = yaml.safe_load(yaml.safe_dump(cfg).replace("model: base", f"model: {root / 'base'}")
                                 .replace("model: a", f"model: {root / 'a'}").replace("model: b", f"model: {root / 'b'}")
                                 .replace("base_model: a", f"base_model: {root / 'a'}"))
            path = root / f"{name}.yml"
            path.write_text(yaml.safe_dump(cfg))
            ours, theirs = [], []
            for rep in range(a.reps):  # interleaved, so drift in the machine hits both alike
                out_c, out_m = root / f"c-{name}-{rep}", root / f"m-{name}-{rep}"
                ours.append(timed([sys.executable, "-m", "compose", "build", str(path), "-o", str(out_c), "--no-progress"]))
                theirs.append(timed([str(mergekit), str(path), str(out_m), "--no-copy-tokenizer", "--random-seed", "0"]))
                shutil.rmtree(out_c)
                shutil.rmtree(out_m)
            wc, wm = statistics.median(w for w, _ in ours), statistics.median(w for w, _ in theirs)
            rc, rm = statistics.median(r for _, r in ours), statistics.median(r for _, r in theirs)
            print(f"{name:<17}{wc:>10.2f}{wm:>11.2f}{wc / wm:>8.2f}{rc / 1e6:>12.0f}{rm / 1e6:>12.0f}{rc / rm:>7.2f}")


if __name__ == "__main__":
    main()
