"""The generated MoE layer (modeling_compose.py's SparseMoE) against transformers' MixtralSparseMoeBlock.

Same seeded random weights (all four layers share the very same tensors), same inputs, one run. Timed:
compose's `grouped_mm` and `loop` dispatch (SparseMoE.dispatch), transformers' `eager` and `grouped_mm`
experts implementations (MixtralConfig(experts_implementation=...), i.e. config._experts_implementation,
which the @use_experts_implementation forward reads at every call), and on CUDA also each one replayed
from a CUDA graph at decode sizes, where it captures. Outputs are compared before anything is timed.

Floors are measured in the same run: copy bandwidth (bytes read + written by a large copy) and the rate of
a big matmul in the dtype. A call's floor is the larger of
    memory: router + the experts this input's routing touches (top_k of them at 1 token) / bandwidth
    matmul: 2 * tokens * top_k * 3 * hidden * intermediate FLOPs / matmul rate
and "%floor" is floor / measured (100% = at the floor). Issue targets, at Mixtral-8x7B sizes on a GPU:
1-token decode within 1.5x of the floor with a CUDA graph (>= 67%), 4096-token prefill >= 70%.

    python bench/moe_layer.py                                   # CPU sizes, fp32 and bf16, 1/16/512 tokens
    python bench/moe_layer.py --device cuda --sizes mixtral     # bf16, 1/4096 tokens, + CUDA graphs

On a small shared CPU box, --threads 1 gives steadier numbers (a busy core stalls a multi-threaded GEMM).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"cpu": dict(hidden=1024, intermediate=2816, experts=8, top_k=2),
         "mixtral": dict(hidden=4096, intermediate=14336, experts=8, top_k=2)}  # one Mixtral-8x7B layer


def generated_module():
    """Render and import modeling_compose.py for a tiny upcycled Llama. Its classes take every size from
    Config (a dataclass), so one render serves any layer size."""
    from compose import load, moe
    from compose.codegen import render_modeling
    from compose.pipeline import compile_graph
    spec = moe.upcycle(load("tiny:llama?hidden=64&intermediate=128&heads=4&kv_heads=2&layers=1"),
                       num_experts=8, top_k=2, noise=0.02)
    name = "modeling_compose_bench"
    with tempfile.TemporaryDirectory() as folder:  # once executed, the module no longer needs its file
        path = Path(folder) / "modeling_compose.py"
        path.write_text(render_modeling(compile_graph(spec)))
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses look their module up
        module_spec.loader.exec_module(module)
    return module


def build(mod, size: dict, dtype: torch.dtype, device: str) -> tuple[dict, dict]:
    """The four layers, each built on the meta device and given the same tensors (load_state_dict with
    assign=True): identical weights at no extra memory (a Mixtral-8x7B layer is 2.8 GB in bf16). One
    module per implementation, so no switch is flipped inside a timed call."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    H, I, E, k = size["hidden"], size["intermediate"], size["experts"], size["top_k"]
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, fan_in):  # unit-variance activations in and out of every projection
        return torch.randn(*shape, generator=g, device=device, dtype=dtype) * fan_in ** -0.5
    state = {"gate.weight": randn(E, H, fan_in=H), "experts.gate_up_proj": randn(E, 2 * I, H, fan_in=H),
             "experts.down_proj": randn(E, H, I, fan_in=I)}
    layers = {}
    with torch.device("meta"):
        for dispatch in ("grouped_mm", "loop"):
            layers[f"compose {dispatch}"] = mod.SparseMoE(mod.Config(n_embd=H, expert_size=I, n_experts=E, top_k=k,
                                                                     moe_dispatch=dispatch))
        for impl in ("grouped_mm", "eager"):  # transformers reads config._experts_implementation per call
            layers[f"hf {impl}"] = MixtralSparseMoeBlock(MixtralConfig(
                hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k, experts_implementation=impl))
    for layer in layers.values():
        layer.load_state_dict(state, assign=True)
        layer.eval()
    return layers, state


def timer(device: str, repeats: int, warmup: int = 2):
    """{name: callable} -> {name: median ms of `repeats` calls after `warmup`}. The calls go round-robin, one
    of each per round, so a load that comes and goes (a shared machine) falls on every implementation alike.
    CUDA events per call, so no host sync is timed."""
    def measure(fns: dict) -> dict:
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        times = {name: [] for name in fns}
        if device == "cuda":
            torch.cuda.synchronize()
            events = []
            for _ in range(repeats):
                for name, fn in fns.items():
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    events.append((name, start, end))
            torch.cuda.synchronize()
            for name, start, end in events:
                times[name].append(start.elapsed_time(end))
        else:
            for _ in range(repeats):
                for name, fn in fns.items():
                    t = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t) * 1e3)
        return {name: statistics.median(t) for name, t in times.items()}
    return measure


def copy_bandwidth(device: str, measure) -> float:
    """Bytes/s of a copy far larger than any cache, counting both the read and the write."""
    n = (1 << 30) if device == "cuda" else (256 << 20)
    src, dst = torch.empty(n, dtype=torch.uint8, device=device).fill_(1), torch.empty(n, dtype=torch.uint8, device=device)
    return 2 * n / (measure({"copy": lambda: dst.copy_(src)})["copy"] / 1e3)


def matmul_rate(device: str, dtype: torch.dtype, measure) -> float:
    """FLOP/s of one big square matmul in the dtype: what a well-fed expert GEMM can reach here."""
    n = 8192 if device == "cuda" else 2048
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n ** 3 / (measure({"mm": lambda: a @ b})["mm"] / 1e3)


def graphed(fn, x):
    """fn(x) as a CUDA graph's replay, or the reason it cannot be one. A dry run in sync-debug mode first:
    an implementation that waits on the host (nonzero, .item(): data-dependent shapes) cannot capture, and
    finding that out without a failed capture leaves the CUDA context clean."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(x)
    except RuntimeError as e:
        return None, f"syncs with the host ({str(e).splitlines()[0][:80]})"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    try:
        stream = torch.cuda.Stream()  # warm up on a side stream, as torch.cuda.graph asks
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(x)
        return graph.replay, None
    except RuntimeError as e:
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, help="comma-separated: float32,bfloat16 (default: both on cpu, bf16 on cuda)")
    ap.add_argument("--sizes", default="cpu", choices=sorted(SIZES))
    ap.add_argument("--tokens", default=None, help="comma-separated token counts (default: 1,16,512 cpu; 1,4096 cuda)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row (default: 5 cpu, 50 cuda)")
    ap.add_argument("--graph-max-tokens", type=int, default=16, help="CUDA graphs for token counts up to this")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is steadier on a shared box)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device here")
    dtypes = [getattr(torch, d) for d in (a.dtype or ("bfloat16" if cuda else "float32,bfloat16")).split(",")]
    tokens = [int(t) for t in (a.tokens or ("1,4096" if cuda else "1,16,512")).split(",")]
    size = SIZES[a.sizes]
    H, I, E, k = size["hidden"], size["intermediate"], size["experts"], size["top_k"]
    measure = timer(a.device, a.repeats or (50 if cuda else 5))
    mod = generated_module()
    torch.set_grad_enabled(False)

    bandwidth = copy_bandwidth(a.device, measure)
    where = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; H={H} I={I} E={E} top_k={k}; copy {bandwidth / 1e9:.1f} GB/s")
    rows = []  # (dtype, tokens, impl, ms, floor ms, bound, max|diff|)
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        rate = matmul_rate(a.device, dtype, measure)
        print(f"{dname}: matmul {rate / 1e12:.2f} TFLOP/s")
        layers, state = build(mod, size, dtype, a.device)
        elt = state["gate.weight"].element_size()
        graphs = {}  # tokens -> [(name, floor, bound, diff, layer, x)], captured once every eager timing is done
        for T in tokens:
            x = torch.randn(1, T, H, generator=torch.Generator(device=a.device).manual_seed(T), device=a.device, dtype=dtype)
            # The floor: weights of the experts this input actually reaches, or the FLOPs, whichever is slower.
            hit = layers["compose loop"].gate(x.view(T, H))[1].unique().numel()
            mem_ms = (E * H + hit * 3 * H * I) * elt / bandwidth * 1e3
            mm_ms = 2 * T * k * 3 * H * I / rate * 1e3
            floor, bound = max((mem_ms, "mem"), (mm_ms, "matmul"))
            # Agreement before timing: every implementation against transformers' eager loop.
            expect = layers["hf eager"](x)
            diffs = {name: (layer(x) - expect).abs().max().item() for name, layer in layers.items()}
            ms = measure({name: (lambda layer=layer: layer(x)) for name, layer in layers.items()})
            rows += [(dname, T, name, ms[name], floor, bound, diffs[name]) for name in layers]
            if cuda and T <= a.graph_max_tokens:
                graphs[T] = [(name, floor, bound, diffs[name], layer, x) for name, layer in layers.items()]
        for T, impls in graphs.items():
            replays = {}
            for name, floor, bound, diff, layer, x in impls:
                replay, why = graphed(layer, x)
                if replay is None:
                    print(f"  {name} at {T} tokens: no CUDA graph: {why}")
                else:
                    replays[name] = (replay, floor, bound, diff)
            ms = measure({name: r[0] for name, r in replays.items()})
            rows += [(dname, T, name + " +graph", ms[name], *replays[name][1:]) for name in replays]
        del layers, state, graphs

    print(f"\n{'dtype':<9}{'tokens':>7}  {'impl':<26}{'ms':>9}{'floor ms':>10}{'bound':>8}{'%floor':>8}{'max|diff|':>11}")
    for dname, T, name, ms, floor, bound, diff in sorted(rows, key=lambda r: (dtypes.index(getattr(torch, r[0])), r[1])):
        print(f"{dname:<9}{T:>7}  {name:<26}{ms:>9.3f}{floor:>10.3f}{bound:>8}{100 * floor / ms:>7.0f}%{diff:>11.2e}")
    best = {}  # (dtype, tokens, "compose" | "hf") -> fastest ms, graphs included
    for dname, T, name, ms, *_ in rows:
        key = (dname, T, name.split()[0])
        best[key] = min(best.get(key, ms), ms)
    ratios = [f"{d} {T}: {best[(d, T, 'compose')] / best[(d, T, 'hf')]:.2f}x"
              for d in dict.fromkeys(r[0] for r in rows) for T in tokens]
    print("\ngenerated / transformers-best (ms, lower is better): " + "; ".join(ratios))


if __name__ == "__main__":
    main()
