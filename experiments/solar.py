"""SOLAR depth up-scaling at small scale: how fast does an up-scaled model recover, and where does it end?

A tiny Llama (4 layers, width 64) is trained on a mixture of `add`, `reverse` and `sort` (the original).
`depth_upscale(load(folder), drop=1)` makes it 6 layers: [0, 3) then [1, 4). We report the held-out loss
right after up-scaling, continue training it, and count the steps until its train loss is back at the
original's final train loss; the original is trained for the same extra steps on the same batches for
comparison. Prints a markdown table and writes experiments/solar.png.     python experiments/solar.py [--quick]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import common as C


def main():
    a = C.args(__doc__)
    C.setup(a.threads)
    from compose import build, depth_upscale, load

    tasks, drop = ["add", "reverse", "sort"], 1
    pre, cont, n_eval = (60, 40, 200) if a.quick else (600, 600, 1000)
    every = max(cont // 30, 5)

    def held_out(m):
        r = [C.evaluate(m, t, n_eval) for t in tasks]
        return sum(x[1] for x in r) / len(r), [x[0] for x in r]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        orig = C.tiny_llama(seed=0)
        pre_log = C.train(orig, tasks, pre, lr=3e-3, seed=1, log_every=every)
        orig.save_pretrained(tmp / "orig")
        target = pre_log["loss"][-1]          # the original's final train loss
        orig_loss, orig_acc = held_out(orig)

        out = build(depth_upscale(load(str(tmp / "orig")), drop=drop), tmp / "solar", progress=False)
        models = {"original (4 layers), trained on": C.load_model(tmp / "orig"),
                  f"depth_upscale(drop={drop}) (6 layers)": C.load_model(out)}
        logs, rows = {}, [("original after pre-training", 4, C.n_params(orig), "-", "-", orig_loss, *orig_acc)]
        for name, m in models.items():
            init_loss, init_acc = held_out(m)
            logs[name] = C.train(m, tasks, cont, lr=1e-3, seed=2, log_every=every)
            back = next((s for s, l in zip(logs[name]["step"], logs[name]["loss"]) if l <= target), None)
            loss, acc = held_out(m)
            rows.append((f"{name} +{cont} steps", m.config.num_hidden_layers, C.n_params(m), init_loss,
                         back if back is not None else f"> {cont}", loss, *acc))

    print(f"## SOLAR: {pre} pre-training steps on {'+'.join(tasks)}, then {cont} more steps each;"
          f" the original's final train loss {target:.4f}\n")
    print(C.table(["model", "layers", "params", "held-out loss at start",
                   f"steps to train loss <= {target:.4f} (logged every {every})", "final held-out loss",
                   *[f"{t} acc" for t in tasks]], rows))

    plt = C.plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(pre_log["step"], pre_log["loss"], label="original, pre-training", color="gray")
    for name, log in logs.items():
        ax.plot([pre + s for s in log["step"]], log["loss"], label=name.replace(", trained on", ", continued"))
    ax.axvline(pre, ls=":", color="k")
    ax.set(xlabel="step", ylabel=f"train answer loss (mean of {every} steps)", yscale="log",
           title=f"depth up-scaling (drop={drop}) at step {pre}")
    ax.legend()
    C.save(fig, __file__)


if __name__ == "__main__":
    main()
