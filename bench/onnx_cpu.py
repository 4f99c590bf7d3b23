"""onnxruntime vs PyTorch eager on CPU, for tiny composed models, in one run.

Builds each spec with --format hf,onnx in a temporary folder, then times a full forward (input_ids ->
logits) at batch 1 and 8 in onnxruntime (CPU provider) and in the generated PyTorch module (eager,
torch.no_grad), median of --reps after warm-up, and prints the ratio. Target (issue 6): onnxruntime
<= 1.0x PyTorch. The last row exports the MoE with --dense-moe (PyTorch still dispatches sparsely).

    python bench/onnx_cpu.py [--seq 128] [--reps 20] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SPECS = {
    "llama_pro (tiny, 12 layers)": "expand_blocks(load('tiny:llama'), groups=4)",
    "mixtral upcycle (tiny, 8x top-2)": "moe.upcycle(load('tiny:llama'), num_experts=8, top_k=2, noise=0.02)",
    "calm (tiny llama + qwen2)": "calm(anchor=load('tiny:llama'), augment=load('tiny:qwen2?layers=4&hidden=128'), every=2)",
}
DENSE = {"mixtral, --dense-moe export": "mixtral upcycle (tiny, 8x top-2)"}  # the same spec, dense in ONNX


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import onnxruntime as ort
    import torch

    from compose import build, calm, expand_blocks, load, moe  # noqa: F401  (used by the spec strings)
    from compose.backends.torch import load_module

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {a.threads} threads, sequence {a.seq}")
    print(f"{'model':34} {'batch':>5} {'torch ms':>9} {'ort ms':>9} {'ort/torch':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate([*SPECS, *DENSE]):
            spec = SPECS[DENSE.get(name, name)]
            out = build(eval(spec), Path(tmp) / f"m{i}", formats=["hf", "onnx"], progress=False,
                        dense_moe=name in DENSE)
            model = load_module(out).ComposeForCausalLM.from_pretrained(out)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = a.threads
            session = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
            for batch in (1, 8):
                ids = torch.randint(0, 512, (batch, a.seq))
                feed = {"input_ids": ids.numpy()}
                with torch.no_grad():
                    t_torch = _time(lambda: model(ids), a.reps)
                t_ort = _time(lambda: session.run(None, feed), a.reps)
                print(f"{name:34} {batch:>5} {t_torch:>9.2f} {t_ort:>9.2f} {t_ort / t_torch:>8.2f}x")


if __name__ == "__main__":
    main()
