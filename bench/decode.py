"""Per-token decode latency of composed models at batch 1, eager vs CUDA graphs, against the floor.

The floor of a decode step is the bytes it must read (all weights for a dense model, the router plus
top-k experts plus everything outside the MoE layers for an MoE) over the device's copy bandwidth,
measured in the same run. Targets (issue 6, on a GPU): CUDA-graph decode at >= 70% of the floor. A CALM
row shows the composite kind's decode (two models and cross-attention) on the same footing.

    python bench/decode.py --device cuda              # >= 1B-parameter SOLAR-upscaled Llama + 8-expert MoE, bf16
    python bench/decode.py --device cpu --sizes small # the same code on a CPU-sized config
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

SIZES = {
    # SOLAR: 16 layers -> 2 * (16 - 4) = 24 layers of width 2048: about 1.3B parameters.
    "gpu": dict(dense="tiny:llama?hidden=2048&intermediate=5632&layers=16&heads=16&kv_heads=16&vocab=32000",
                drop=4, moe="tiny:llama?hidden=1024&intermediate=2816&layers=8&heads=8&kv_heads=8&vocab=32000",
                augment="tiny:qwen2?hidden=1024&intermediate=2816&layers=8&heads=8&kv_heads=8&vocab=32000"),
    "small": dict(dense="tiny:llama?hidden=256&intermediate=688&layers=6&heads=4&kv_heads=4&vocab=4096",
                  drop=2, moe="tiny:llama?hidden=256&intermediate=688&layers=4&heads=4&kv_heads=4&vocab=4096",
                  augment="tiny:qwen2?hidden=128&intermediate=344&layers=4&heads=4&kv_heads=4&vocab=4096"),
}


def bandwidth(device, dtype) -> float:
    """Bytes per second of a large device copy (read + write)."""
    import torch

    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def decode_ms(module, model, steps: int, cuda_graph: bool, device) -> float:
    """Median milliseconds per decode step after a 16-token prompt."""
    import torch

    from compose.backends import runtime

    ids = torch.randint(0, model.model.config.vocab_size, (1, 16), device=device)
    runtime.generate(module, model, ids, 4, cuda_graph=cuda_graph)  # warm-up (and capture)
    _sync(device)
    t = time.perf_counter()
    runtime.generate(module, model, ids, steps, cuda_graph=cuda_graph)
    _sync(device)
    total = time.perf_counter() - t
    _sync(device)
    t = time.perf_counter()
    runtime.generate(module, model, ids, 0, cuda_graph=cuda_graph)  # the prompt alone
    _sync(device)
    return (total - (time.perf_counter() - t)) / steps * 1000


def active_bytes(model) -> tuple[int, int]:
    """(all parameter bytes, bytes one decode step reads: unrouted experts left out)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    skipped = 0
    for m in model.modules():
        if hasattr(m, "experts") and hasattr(m, "gate"):
            per = (m.experts.gate_up_proj[0].numel() + m.experts.down_proj[0].numel()) * m.experts.down_proj.element_size()
            skipped += (m.experts.gate_up_proj.size(0) - m.gate.top_k) * per
    return total, total - skipped


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", choices=SIZES, default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--steps", type=int, default=64)
    a = ap.parse_args()

    import torch

    from compose import build, calm, depth_upscale, load, moe
    from compose.backends import runtime

    device = torch.device(a.device)
    sizes = SIZES[a.sizes or ("gpu" if device.type == "cuda" else "small")]
    dtype = a.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    bw = bandwidth(device, dtype)
    print(f"device {device}, dtype {dtype}, copy bandwidth {bw / 1e9:.1f} GB/s, torch {torch.__version__}")
    print(f"{'model':40} {'params':>8} {'read MB':>8} {'floor ms':>9} {'eager ms':>9} {'graph ms':>9} {'graph %floor':>12}")
    specs = {
        "SOLAR-upscaled Llama (dense)": depth_upscale(load(sizes["dense"], dtype=dtype), drop=sizes["drop"]),
        "upcycled MoE (8 experts, top-2)": moe.upcycle(load(sizes["moe"], dtype=dtype), num_experts=8, top_k=2,
                                                       noise=0.01),
        # The anchor is the MoE's base model; the augmenting model reads the same tokens.
        "CALM (cross-attention every 2 layers)": calm(anchor=load(sizes["moe"], dtype=dtype),
                                                      augment=load(sizes["augment"], dtype=dtype), every=2),
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, spec) in enumerate(specs.items()):
            out = build(spec, Path(tmp) / f"m{i}", formats=["hf", "torch"], progress=False)
            module, model = runtime.load(out, device=a.device, dtype=dtype)
            total, read = active_bytes(model)
            floor = read / bw * 1000
            eager = decode_ms(module, model, a.steps, False, device)
            graph = decode_ms(module, model, a.steps, True, device) if device.type == "cuda" else float("nan")
            pct = f"{100 * floor / graph:.0f}%" if device.type == "cuda" else "n/a (CPU)"
            params = sum(p.numel() for p in model.parameters())
            print(f"{name:40} {params / 1e9:>7.2f}B "
                  f"{read / 1e6:>8.0f} {floor:>9.3f} {eager:>9.3f} {graph:>9.3f} {pct:>12}")
            del model


if __name__ == "__main__":
    main()
