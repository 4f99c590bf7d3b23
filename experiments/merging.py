"""Model merging at small scale: two fine-tunes of one base, merged with compose's merge methods.

A base (4 layers, width 64) is pre-trained on a mixture of `copy` and `shift` (x+1 mod 32); two copies of it
are fine-tuned, one on A = `reverse`, one on B = `sort`. Each task has its own marker token, so a merged
model could in principle do both. The parents and each merge (`merge.linear`, `merge.slerp`,
`merge.task_arithmetic`, `merge.ties`, built with compose and loaded with transformers) are scored on A and B.
Prints a markdown table and writes experiments/merging.png.    python experiments/merging.py [--quick]
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import common as C


def main():
    a = C.args(__doc__)
    C.setup(a.threads)
    from compose import build, load, merge

    A, B = "reverse", "sort"
    pre, ft, n_eval = (60, 60, 200) if a.quick else (400, 500, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = C.tiny_llama(seed=0)
        C.train(base, ["copy", "shift"], pre, lr=3e-3, seed=1)
        base.save_pretrained(tmp / "base")
        for name, task, seed in (("ft_a", A, 2), ("ft_b", B, 3)):
            m = C.load_model(tmp / "base")
            C.train(m, task, ft, lr=1e-3, seed=seed)
            m.save_pretrained(tmp / name)

        b, fa, fb = (load(str(tmp / n)) for n in ("base", "ft_a", "ft_b"))
        specs = {
            "merge.linear(weights=[0.5, 0.5])": merge.linear([fa, fb], weights=[0.5, 0.5]),
            "merge.slerp(t=0.5)": merge.slerp(fa, fb, t=0.5),
            "merge.task_arithmetic(weights=[1, 1])": merge.task_arithmetic(base=b, models=[fa, fb], weights=[1.0, 1.0]),
            "merge.task_arithmetic(weights=[0.5, 0.5])": merge.task_arithmetic(base=b, models=[fa, fb],
                                                                              weights=[0.5, 0.5]),
            "merge.ties(density=0.5, weights=[1, 1])": merge.ties(base=b, models=[fa, fb], density=0.5,
                                                                 weights=[1.0, 1.0]),
        }
        rows = []
        for name, folder in (("base", "base"), (f"parent A (fine-tuned on {A})", "ft_a"),
                             (f"parent B (fine-tuned on {B})", "ft_b")):
            m = C.load_model(tmp / folder)
            rows.append((name, C.evaluate(m, A, n_eval)[0], C.evaluate(m, B, n_eval)[0]))
        for i, (name, spec) in enumerate(specs.items()):
            out = build(spec, tmp / f"merge{i}", progress=False)
            m = C.load_model(out)
            rows.append((name, C.evaluate(m, A, n_eval)[0], C.evaluate(m, B, n_eval)[0]))

    print(f"## Merging: A = {A}, B = {B}; base {pre} steps on copy+shift, each parent {ft} steps\n")
    print(C.table(["model", f"A ({A}) acc", f"B ({B}) acc"], rows))

    plt = C.plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r[1] for r in rows], 0.4, label=f"A ({A})")
    ax.bar([x + 0.2 for x in xs], [r[2] for r in rows], 0.4, label=f"B ({B})")
    ax.set_xticks(list(xs), [r[0].replace("merge.", "").replace(" (", "\n(") for r in rows], rotation=30,
                  ha="right", fontsize=7)
    ax.set(ylabel="held-out exact match", ylim=(0, 1.05), title="parents and merges")
    ax.legend()
    C.save(fig, __file__)


if __name__ == "__main__":
    main()
