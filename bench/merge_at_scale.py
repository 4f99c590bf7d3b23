"""compose vs mergekit at the size users merge, measured against this machine's own disk, in one run.

Three models of Llama-3.2-3B's shape (hidden 3072, 28 layers, 24 heads / 8 kv heads, intermediate 8192,
vocab 128256, tied embeddings, bfloat16, 2 GB shards; random weights: a base and two fine-tunes of it) are
generated once into a cache folder (reruns reuse them). For each job, compose and mergekit run as whole
commands, interleaved, on cold page caches (each source file's cache is dropped before every run), and
the script prints per job and tool:

- wall seconds until the output is on disk (the process's run, then `sync` of what it left dirty in the
  page cache), and the process's own run alone;
- peak RSS, split into anonymous and file-backed memory (polled from /proc/PID/status);
- GB read and written (the process's own disk I/O, /proc/PID/io) and GB/s over the wall time;
- the ratio to mergekit's wall time;
- the share of the disk bound reached: (read / read speed + written / write speed) / wall, the speeds
  measured in the same run (a write with fsync, a read after dropping the file's cache);
- tensor equality with mergekit's output (max |difference| over every tensor).

    pip install -e '.[peer]'      # mergekit 0.1.5
    python bench/merge_at_scale.py [--cache DIR] [--jobs linear,slerp,solar,llama_pro] [--reps 1]

`--jobs ties` is left out of the default: at this size TIES is a full sort of every tensor in both tools
(compose 7.7 minutes, mergekit 11 on 2 cores), which alone would double the run. With the default jobs
the run takes about 10 minutes, plus 4 to 11 to generate the models the first time.

It refuses to start without the disk space it computes (the models, two outputs of the largest job, and
the disk probe). Nothing here is a test: the numbers are read, not asserted.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

SHAPE = dict(vocab=128256, hidden=3072, layers=28, heads=24, kv_heads=8, intermediate=8192)
SHARD = 2_000_000_000
MODELS = ("base", "a", "b")


# -- the models ---------------------------------------------------------------------------------------------

def tensor_shapes() -> dict[str, tuple[int, ...]]:
    s = SHAPE
    hd = s["hidden"] // s["heads"]
    h, kv, i = s["hidden"], s["kv_heads"] * hd, s["intermediate"]
    out = {"model.embed_tokens.weight": (s["vocab"], h)}
    for n in range(s["layers"]):
        p = f"model.layers.{n}."
        out.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (h, h),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.o_proj.weight": (h, h), p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                    p + "mlp.down_proj.weight": (h, i)})
    out["model.norm.weight"] = (h,)
    return out


def model_bytes() -> int:
    return sum(2 * math.prod(s) for s in tensor_shapes().values())


def config_json() -> dict:
    s = SHAPE
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s["vocab"],
            "hidden_size": s["hidden"], "intermediate_size": s["intermediate"], "num_hidden_layers": s["layers"],
            "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
            "head_dim": s["hidden"] // s["heads"], "hidden_act": "silu", "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": 128001,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
            "dtype": "bfloat16"}


def make_models(cache: Path) -> None:
    """base: seeded normal weights (norms near 1); a, b: base plus small seeded noise. bf16, 2 GB shards."""
    import torch
    from safetensors.torch import save_file

    shapes = tensor_shapes()
    for m, name in enumerate(MODELS):
        folder = cache / name
        if (folder / "done.json").exists():
            continue
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        shards: list[dict] = [{}]
        size = 0
        for k, shape in shapes.items():
            n = 2 * math.prod(shape)
            if shards[-1] and size + n > SHARD:
                shards.append({})
                size = 0
            shards[-1][k] = shape
            size += n
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for fname, shard in zip(names, shards):
            tensors = {}
            for k, shape in shard.items():
                g = torch.Generator().manual_seed(hash_seed(k))
                x = torch.randn(shape, generator=g)
                if k.endswith("norm.weight"):
                    x = 1.0 + 0.1 * x
                else:
                    x *= 0.02
                if name != "base":  # a fine-tune: the base plus noise of its own
                    x += 0.002 * torch.randn(shape, generator=torch.Generator().manual_seed(hash_seed(k) + m))
                tensors[k] = x.to(torch.bfloat16)
                del x
                weight_map[k] = fname
            save_file(tensors, folder / fname, metadata={"format": "pt"})
            del tensors
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": model_bytes()}, "weight_map": weight_map}, indent=1))
        (folder / "config.json").write_text(json.dumps(config_json(), indent=1))
        (folder / "done.json").write_text(json.dumps({"shape": SHAPE}))
        print(f"  generated {name}: {model_bytes() / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s", flush=True)


def hash_seed(key: str) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:6], "little")


# -- the disk -----------------------------------------------------------------------------------------------

def drop_cache(path: Path) -> None:
    """Evict a file's pages from the page cache (clean pages; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_folder(folder: Path) -> None:
    for p in folder.glob("*.safetensors"):
        drop_cache(p)


def measure_disk(root: Path, size: int = 2 * 1024**3) -> tuple[float, float]:
    """(write bytes/s with fsync, cold read bytes/s) of a `size`-byte file under root."""
    path = root / "disk_probe.bin"
    block = os.urandom(64 * 1024**2)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size / (time.perf_counter() - t)
    drop_cache(path)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * 1024**2):
            pass
    read = size / (time.perf_counter() - t)
    path.unlink()
    return write, read


# -- one run ------------------------------------------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[k] = int(v.split()[0]) * 1024
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("read_bytes", "write_bytes"):
                out[k] = int(v)
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def run(cmd: list[str], log: Path) -> dict:
    """Wall time, peak RSS (total, anonymous, file-backed) and disk bytes of one whole command."""
    peak = {"VmHWM": 0, "RssAnon": 0, "RssFile": 0, "read_bytes": 0, "write_bytes": 0}
    t = time.perf_counter()
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def poll():
            while not done.is_set():
                s = _status(p.pid)
                for k in peak:
                    peak[k] = max(peak[k], s.get(k, 0))
                done.wait(0.05)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        rc = p.wait()
        done.set()
        poller.join()
    wall = time.perf_counter() - t
    if rc:
        sys.exit(f"failed ({rc}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    # A merge is done when its bytes are on disk: a tool that exits with gigabytes still dirty in the page
    # cache has not finished writing them. The time to sync them is counted.
    os.sync()
    return {"wall": time.perf_counter() - t, "exit": wall, "rss": peak["VmHWM"], "anon": peak["RssAnon"], "file": peak["RssFile"],
            "read": peak["read_bytes"], "written": peak["write_bytes"]}


# -- the jobs -----------------------------------------------------------------------------------------------

def jobs(cache: Path) -> dict[str, tuple[dict | str, dict]]:
    """job -> (compose's spec: a mergekit config or Python source, mergekit's config)."""
    a, b, base = (str(cache / m) for m in ("a", "b", "base"))
    n = SHAPE["layers"]
    linear = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": a, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]}
    ties = {"merge_method": "ties", "base_model": base, "dtype": "bfloat16",
            "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}},
                       {"model": b, "parameters": {"weight": 1.0, "density": 0.5}}]}
    slerp = {"merge_method": "slerp", "base_model": a, "dtype": "bfloat16", "parameters": {"t": 0.5},
             "models": [{"model": a}, {"model": b}]}
    solar = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": [
        {"sources": [{"model": a, "layer_range": [0, n - 4]}]},
        {"sources": [{"model": a, "layer_range": [4, n]}]}]}
    # LLaMA-Pro as mergekit users write it: each group's last layer again, its o_proj and down_proj scaled by 0.
    group = n // 4
    slices = []
    for g in range(4):
        slices.append({"sources": [{"model": a, "layer_range": [g * group, (g + 1) * group]}]})
        slices.append({"sources": [{"model": a, "layer_range": [(g + 1) * group - 1, (g + 1) * group]}],
                       "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                {"filter": "down_proj", "value": 0.0}, {"value": 1.0}]}})
    pro_mk = {"merge_method": "passthrough", "dtype": "bfloat16", "slices": slices}
    pro_compose = f"from compose import expand_blocks, load\nmodel = expand_blocks(load({a!r}), groups=4)\n"
    return {"linear": (linear, linear), "ties": (ties, ties), "slerp": (slerp, slerp), "solar": (solar, solar),
            "llama_pro": (pro_compose, pro_mk)}


def output_bytes(job: str) -> int:
    per_layer = (model_bytes() - 2 * SHAPE["vocab"] * SHAPE["hidden"]) / SHAPE["layers"]
    layers = {"solar": 2 * (SHAPE["layers"] - 4), "llama_pro": SHAPE["layers"] + 4}.get(job, SHAPE["layers"])
    return int(layers * per_layer + 2 * SHAPE["vocab"] * SHAPE["hidden"])


def compare(ours: Path, theirs: Path) -> str:
    """max |difference| over every tensor both wrote, and the names only one wrote."""
    import torch
    from safetensors import safe_open

    def files(folder):
        index = folder / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            return {k: folder / f for k, f in wm.items()}
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: folder / "model.safetensors" for k in f.keys()}

    a, b = files(ours), files(theirs)
    handles = {p: safe_open(p, "pt") for p in set(a.values()) | set(b.values())}
    worst = 0.0
    for k in sorted(set(a) & set(b)):
        x, y = handles[a[k]].get_tensor(k), handles[b[k]].get_tensor(k)
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{k}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if not torch.equal(x, y):  # the difference only where there is one (the float copies are slow)
            worst = max(worst, (x.float() - y.float()).abs().max().item())
        del x, y
    only = sorted(set(a) ^ set(b))
    same = "identical" if worst == 0 else f"max|diff| {worst:g}"
    return same + (f", {len(only)} names in one only ({only[0]}, ...)" if only else "")


# -- main ---------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "compose-bench" / "llama3b")
    ap.add_argument("--jobs", default="linear,slerp,solar,llama_pro", help="of linear, ties, slerp, solar, llama_pro")
    ap.add_argument("--reps", type=int, default=1, help="runs of each tool per job (the median is printed)")
    ap.add_argument("--compose-args", default="", help="extra flags for compose build (e.g. '--workers 1')")
    args = ap.parse_args()
    names = args.jobs.split(",")
    table = jobs(args.cache)
    unknown = sorted(set(names) - set(table))
    if unknown:
        sys.exit(f"--jobs: unknown {unknown} (choose from {', '.join(table)})")
    args.cache.mkdir(parents=True, exist_ok=True)
    missing = sum(model_bytes() for m in MODELS if not (args.cache / m / "done.json").exists())
    need = missing + 2 * max(output_bytes(j) for j in names) + 2 * 1024**3
    free = shutil.disk_usage(args.cache).free
    if free < need * 1.05:
        sys.exit(f"needs {need / 1e9:.1f} GB free under {args.cache}, has {free / 1e9:.1f} GB")
    print(f"models: Llama-3.2-3B's shape, {model_bytes() / 1e9:.2f} GB each in bf16, cached in {args.cache}",
          flush=True)
    make_models(args.cache)
    write_bw, read_bw = measure_disk(args.cache)
    print(f"disk: write {write_bw / 1e6:.0f} MB/s (fsync), read {read_bw / 1e6:.0f} MB/s (cold)", flush=True)

    work = args.cache / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    exe = Path(sys.executable).parent
    results: dict[str, dict[str, list[dict]]] = {}
    for job in names:
        spec, mk = table[job]
        if isinstance(spec, dict):
            spec_path = work / f"{job}.yml"
            spec_path.write_text(yaml.safe_dump(spec))
        else:
            spec_path = work / f"{job}.py"
            spec_path.write_text(spec)
        mk_path = work / f"{job}.mergekit.yml"
        mk_path.write_text(yaml.safe_dump(mk))
        cmds = {"compose": [sys.executable, "-m", "compose", "build", str(spec_path), "-o", str(work / "compose"),
                            "--no-progress", *args.compose_args.split()],
                "mergekit": [str(exe / "mergekit-yaml"), str(mk_path), str(work / "mergekit"), "--no-copy-tokenizer",
                             "--lazy-unpickle", "--quiet"]}
        results[job] = {"compose": [], "mergekit": []}
        for rep in range(args.reps):
            order = ["compose", "mergekit"] if rep % 2 == 0 else ["mergekit", "compose"]
            for tool in order:
                shutil.rmtree(work / tool, ignore_errors=True)
                for m in MODELS:
                    drop_folder(args.cache / m)
                r = run(cmds[tool], work / f"{job}.{tool}.log")
                results[job][tool].append(r)
                print(f"  {job} {tool}: {r['wall']:.1f} s to disk ({r['exit']:.1f} s to exit), peak RSS {r['rss'] / 1e9:.2f} GB "
                      f"(anon {r['anon'] / 1e9:.2f}, file {r['file'] / 1e9:.2f})", flush=True)
        results[job]["equal"] = compare(work / "compose", work / "mergekit")
        for tool in ("compose", "mergekit"):
            shutil.rmtree(work / tool, ignore_errors=True)

    print("\n| job | tool | wall s (exit s) | x mergekit | peak RSS GB (anon / file) | GB read + written | GB/s | "
          "disk bound | tensors vs mergekit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for job in names:
        med = {t: {k: statistics.median(r[k] for r in results[job][t]) for k in results[job][t][0]}
               for t in ("compose", "mergekit")}
        for tool in ("compose", "mergekit"):
            m = med[tool]
            moved = m["read"] + m["written"]
            bound = m["read"] / read_bw + m["written"] / write_bw
            print(f"| {job} | {tool} | {m['wall']:.1f} ({m['exit']:.1f}) | {m['wall'] / med['mergekit']['wall']:.2f} | "
                  f"{m['rss'] / 1e9:.2f} ({m['anon'] / 1e9:.2f} / {m['file'] / 1e9:.2f}) | "
                  f"{m['read'] / 1e9:.1f} + {m['written'] / 1e9:.1f} | {moved / 1e9 / m['wall']:.2f} | "
                  f"{100 * bound / m['wall']:.0f}% | {results[job]['equal'] if tool == 'compose' else ''} |")
    print(f"\ndisk: write {write_bw / 1e6:.0f} MB/s, read {read_bw / 1e6:.0f} MB/s; the disk bound is the time "
          "to read and write those bytes at those speeds, one after the other; 100% is disk speed.")


if __name__ == "__main__":
    main()
