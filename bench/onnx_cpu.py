"""onnxruntime vs PyTorch eager on CPU, for tiny composed models, in one run.

Builds each spec with --format hf,onnx in a temporary folder, with the fusion passes (the default) and
without them (--no-fuse), then times a full forward (input_ids -> logits) at batch 1 and 8 in onnxruntime
(CPU provider) and in the generated PyTorch module (eager, torch.no_grad), median of --reps after warm-up.
Prints onnxruntime's time over PyTorch's (both fused) and the fused over the unfused time of each runtime.
Targets (issues 6 and 15): onnxruntime <= 1.0x PyTorch, CALM at batch 8 included. The last row exports the
MoE with --dense-moe (PyTorch still dispatches sparsely). CALM and CogVLM are never fused (their generated
modules keep the checkpoint's layout), so their fused/unfused rows measure noise.

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
    from compose.backends.onnx import prompt_inputs
    from compose.backends.torch import load_module

    torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {a.threads} threads, sequence {a.seq}")
    print(f"{'model':34} {'batch':>5} {'torch ms':>9} {'ort ms':>9} {'ort/torch':>9} "
          f"{'torch fused/unfused':>20} {'ort fused/unfused':>18} {'export s':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate([*SPECS, *DENSE]):
            spec = SPECS[DENSE.get(name, name)]
            models, sessions, export = {}, {}, {}
            for fuse in (True, False):
                t = time.perf_counter()
                out = build(eval(spec), Path(tmp) / f"m{i}-{fuse}", formats=["hf", "onnx"], progress=False,
                            dense_moe=name in DENSE, fuse=fuse)
                export[fuse] = time.perf_counter() - t
                models[fuse] = load_module(out).ComposeForCausalLM.from_pretrained(out)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = a.threads
                sessions[fuse] = ort.InferenceSession(str(out / "model.onnx"), opts,
                                                      providers=["CPUExecutionProvider"])
            for batch in (1, 8):
                ids = torch.randint(0, 512, (batch, a.seq))
                feed = prompt_inputs(sessions[True], ids.numpy())  # a decoder also takes a mask, positions, empty past
                t_torch, t_ort = {}, {}
                for fuse in (True, False):
                    with torch.no_grad():
                        t_torch[fuse] = _time(lambda: models[fuse](ids), a.reps)
                    t_ort[fuse] = _time(lambda: sessions[fuse].run(None, feed), a.reps)
                print(f"{name:34} {batch:>5} {t_torch[True]:>9.2f} {t_ort[True]:>9.2f} "
                      f"{t_ort[True] / t_torch[True]:>8.2f}x {t_torch[True] / t_torch[False]:>19.2f}x "
                      f"{t_ort[True] / t_ort[False]:>17.2f}x {export[True]:>9.0f}")


if __name__ == "__main__":
    main()
