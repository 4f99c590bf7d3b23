"""Sparse upcycling at small scale: continue training a dense model vs its Mixtral upcycling.

A tiny dense Llama (4 layers, width 64) is pre-trained on a mixture of `add`, `reverse` and `sort`. Then
for the same number of steps, on the same batches, we continue training (i) the dense model and
(ii) `moe.upcycle(load(folder), num_experts=4, top_k=2, noise=0.01)` loaded as MixtralForCausalLM (every
FFN copied into 4 experts with a little seeded noise, random router). Plots both loss curves and reports
the final held-out accuracy. The router's load-balancing loss is not added (plain answer cross-entropy for
both). Prints a markdown table and writes experiments/upcycling.png.   python experiments/upcycling.py [--quick]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import common as C


def main():
    a = C.args(__doc__)
    C.setup(a.threads)
    from compose import build, load, moe

    tasks = ["add", "reverse", "sort"]
    pre, cont, n_eval = (60, 40, 200) if a.quick else (600, 600, 1000)
    every = max(cont // 20, 5)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dense = C.tiny_llama(seed=0)
        C.train(dense, tasks, pre, lr=3e-3, seed=1)
        dense.save_pretrained(tmp / "dense")
        start = {t: C.evaluate(dense, t, n_eval)[0] for t in tasks}

        out = build(moe.upcycle(load(str(tmp / "dense")), num_experts=4, top_k=2, noise=0.01), tmp / "moe",
                    progress=False)
        models = {"dense": C.load_model(tmp / "dense"), "upcycled MoE (4 experts, top-2)": C.load_model(out)}
        logs, rows, times = {}, [], {}
        for name, m in models.items():
            init_loss = sum(C.evaluate(m, t, n_eval)[1] for t in tasks) / len(tasks)
            with C.Timer() as tm:
                logs[name] = C.train(m, tasks, cont, lr=1e-3, seed=2, log_every=every)
            accs = [C.evaluate(m, t, n_eval) for t in tasks]
            rows.append((f"{name} [{type(m).__name__}]", C.n_params(m), init_loss, logs[name]["loss"][-1],
                         sum(x[1] for x in accs) / len(tasks), *[x[0] for x in accs], f"{tm.s:.0f}"))

    print(f"## Upcycling: {pre} dense pre-training steps on {'+'.join(tasks)}, then {cont} more steps each"
          f" (accuracy at the start: " + ", ".join(f"{t} {v:.3f}" for t, v in start.items()) + ")\n")
    print(C.table(["model", "params", "held-out loss at start", "final train loss", "final held-out loss",
                   *[f"{t} acc" for t in tasks], "train s"], rows))

    plt = C.plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, log in logs.items():
        ax.plot(log["step"], log["loss"], label=name)
    ax.set(xlabel="continued-training step", ylabel=f"train answer loss (mean of {every} steps)", yscale="log",
           title="dense vs upcycled, same batches")
    ax.legend()
    C.save(fig, __file__)


if __name__ == "__main__":
    main()
