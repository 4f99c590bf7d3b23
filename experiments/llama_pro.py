"""LLaMA-Pro at small scale: does training only the new (identity-initialised) blocks learn task B while
keeping task A, where full fine-tuning forgets A?

A tiny Llama (4 layers, width 64) is pre-trained on A = `sort` (sort 6 numbers), then trained on B = `reverse`
for the same number of steps in two ways:
  (a) full fine-tuning of all parameters;
  (b) `expand_blocks(load(folder), groups=2)` (4 -> 6 layers), only the new blocks train (compose.json's
      "trainable" sets requires_grad).
Prints a markdown table and writes experiments/llama_pro.png.    python experiments/llama_pro.py [--quick]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import common as C


def main():
    a = C.args(__doc__)
    C.setup(a.threads)
    from compose import build, expand_blocks, load

    A, B = "sort", "reverse"
    pre, ft, n_eval = (150, 60, 200) if a.quick else (900, 400, 1000)
    every = max(ft // 10, 5)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = C.tiny_llama(seed=0)
        C.train(model, A, pre, lr=3e-3, seed=1)
        model.save_pretrained(tmp / "base")
        rows = [("pre-trained on A", C.n_params(model), "-", *C.evaluate(model, A, n_eval)[:1], *C.evaluate(model, B, n_eval)[:1])]

        logs = {}
        full = C.load_model(tmp / "base")
        logs["(a) full fine-tune"] = C.train(full, B, ft, lr=3e-3, seed=2, log_every=every, eval_tasks=[A, B])
        rows.append(("(a) full fine-tune on B", C.n_params(full), C.n_params(full, True),
                     C.evaluate(full, A, n_eval)[0], C.evaluate(full, B, n_eval)[0]))

        out = build(expand_blocks(load(str(tmp / "base")), groups=2), tmp / "pro", progress=False)
        pro = C.load_model(out)
        C.set_trainable(pro, out)
        before = C.evaluate(pro, A, n_eval)[0]
        logs["(b) LLaMA-Pro, new blocks only"] = C.train(pro, B, ft, lr=3e-3, seed=2, log_every=every,
                                                        eval_tasks=[A, B])
        rows.append(("(b) expand_blocks(groups=2), new blocks on B", C.n_params(pro), C.n_params(pro, True),
                     C.evaluate(pro, A, n_eval)[0], C.evaluate(pro, B, n_eval)[0]))

    print(f"## LLaMA-Pro: A = {A}, B = {B}; {pre} pre-training steps on A, {ft} steps on B"
          f" (expanded model's A accuracy before training: {before:.3f})\n")
    print(C.table(["model", "params", "trainable", f"A ({A}) acc", f"B ({B}) acc"], rows))

    plt = C.plt()
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    for name, log in logs.items():
        for i, t in enumerate((A, B)):
            ax[i].plot(log["step"], [e[0] for e in log["eval"][t]], label=name)
    for i, t in enumerate((A, B)):
        ax[i].set(title=f"task {'AB'[i]} ({t}) held-out accuracy while training on B", xlabel="step on B",
                  ylabel="exact match", ylim=(-0.02, 1.02))
        ax[i].legend()
    C.save(fig, __file__)


if __name__ == "__main__":
    main()
