"""The fusion passes (fuse-qkv, fuse-gate-up) measured: the same spec built with and without them (--no-fuse),
timed in one run, interleaved, on this machine's CPU.

Prints, per model size: greedy decode tokens/s at batch 1 in the generated PyTorch module, a prefill
forward (batch 1 and 8) in the module and in onnxruntime, fused/unfused ratios, and the largest logit
difference between the two modules (the checkpoint is the same file either way). Target (issue 15):
fused decode >= 1.2x unfused tokens/s at batch 1 on CPU, logits within 1e-6.

    python bench/fusion.py [--sizes small,medium] [--reps 7] [--threads 2] [--no-onnx]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {
    "small": "tiny:llama?hidden=256&intermediate=688&layers=6&heads=4&kv_heads=2&vocab=4096",
    "medium": "tiny:llama?hidden=1024&intermediate=2816&layers=8&heads=16&kv_heads=4&vocab=32000",
    "large": "tiny:llama?hidden=2048&intermediate=5632&layers=8&heads=16&kv_heads=8&vocab=32000",
}


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--no-onnx", action="store_true")
    a = ap.parse_args()

    import torch

    from compose import build, load
    from compose.backends.torch import load_module
    from onnx_cpu import _time  # median ms after warm-up (bench/ is the script's folder)

    torch.set_num_threads(a.threads)
    formats = ["hf", "torch"] if a.no_onnx else ["hf", "onnx"]
    print(f"torch {torch.__version__}, {a.threads} threads, median of {a.reps}, decode {a.new_tokens} tokens")
    print(f"{'size':8} {'what':26} {'unfused':>10} {'fused':>10} {'fused/unfused':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            ref = SIZES[size]
            outs = {fuse: build(load(ref), Path(tmp) / f"{size}-{fuse}", formats=formats, progress=False, fuse=fuse)
                    for fuse in (False, True)}
            same = all((outs[False] / f.name).read_bytes() == f.read_bytes()
                       for f in outs[True].glob("*.safetensors"))
            models = {f: load_module(o).ComposeForCausalLM.from_pretrained(o) for f, o in outs.items()}
            prompt = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
            batch = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                diff = (models[True](batch) - models[False](batch)).abs().max().item()
            rows = {"decode tokens/s (batch 1)": {}, "prefill ms (1 x 64)": {}, "prefill ms (8 x 64)": {}}
            for _ in range(a.reps):  # interleaved: the machine's drift hits both alike
                for fuse, m in models.items():
                    rows["decode tokens/s (batch 1)"].setdefault(fuse, []).append(
                        a.new_tokens / _seconds(lambda: m.generate(prompt, a.new_tokens)))
            with torch.no_grad():
                for fuse, m in models.items():
                    rows["prefill ms (1 x 64)"][fuse] = [_time(lambda: m(batch[:1]), a.reps)]
                    rows["prefill ms (8 x 64)"][fuse] = [_time(lambda: m(batch), a.reps)]
            if not a.no_onnx:
                import onnxruntime as ort

                from compose.backends.onnx import prompt_inputs

                for fuse, out in outs.items():
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = a.threads
                    s = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
                    feed = prompt_inputs(s, batch.numpy())  # a decoder also takes a mask, positions, empty past
                    ms = _time(lambda: s.run(None, feed), a.reps)
                    rows.setdefault("onnxruntime ms (8 x 64)", {})[fuse] = [ms]
            for what, v in rows.items():
                u, f = statistics.median(v[False]), statistics.median(v[True])
                ratio = f / u if "tokens/s" in what else u / f  # > 1: fused is faster
                print(f"{size:8} {what:26} {u:10.1f} {f:10.1f} {ratio:13.2f}x")
            print(f"{size:8} {'max |logit diff|':26} {diff:10.2e}   checkpoint identical: {same}")


if __name__ == "__main__":
    main()
