"""Shared pieces of the small-scale experiments: synthetic tasks, a tiny Llama, a training loop, accuracy.

Everything is generated here from fixed seeds; nothing is downloaded. A sequence is

    [task marker, x_1 .. x_k, SEP, y_1 .. y_m]

over number tokens 0..NUM-1; only the answer y_1..y_m is scored. Accuracy is exact match of the whole answer
under greedy argmax at its teacher-forced positions, on a held-out set: an input is held out when a hash of
its tuple falls in one bucket of ten, and training never samples those inputs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

NUM = 32                      # number tokens 0..31
SEP = NUM                     # separator before the answer
TASKS = ["add", "reverse", "sort", "copy", "shift"]
MARK = {t: NUM + 1 + i for i, t in enumerate(TASKS)}
VOCAB = 48
LEN = 6                       # input length of the sequence tasks
P = 31                        # modulus of `add`


def setup(threads: int = 2, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def args(description: str):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a fast smoke run (fewer steps, smaller eval set)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--png", default=None, help="where to write the plot (default: experiments/<name>.png)")
    a = p.parse_args()
    global _PNG
    _PNG = a.png
    return a


_PNG = None


# ----------------------------------------------------------------------------------------------- tasks

def _answer(task: str, x: torch.Tensor) -> torch.Tensor:
    if task == "add":
        return ((x[:, 0] + x[:, 1]) % P)[:, None]
    if task == "reverse":
        return x.flip(1)
    if task == "sort":
        return x.sort(1).values
    if task == "copy":
        return x
    if task == "shift":
        return (x + 1) % NUM
    raise ValueError(task)


def _held_out(x: torch.Tensor) -> torch.Tensor:
    """True for inputs reserved for evaluation (a fixed hash of the tuple, one bucket of ten)."""
    w = torch.tensor([7919, 104729, 1299709, 15485863, 179424673, 2147483647][: x.shape[1]], dtype=torch.int64)
    return ((x.long() * w).sum(1) * 2654435761 % 1000003) % 10 == 0


def sample(task: str, n: int, gen: torch.Generator, *, split: str = "train") -> tuple[torch.Tensor, int]:
    """n sequences of `task` from `split` ('train' or 'test'); returns (ids, answer length)."""
    k = 2 if task == "add" else LEN
    hi = P if task == "add" else NUM
    out = []
    while sum(len(o) for o in out) < n:
        x = torch.randint(0, hi, (2 * n, k), generator=gen)
        keep = _held_out(x) if split == "test" else ~_held_out(x)
        out.append(x[keep])
    x = torch.cat(out)[:n]
    y = _answer(task, x)
    ids = torch.cat([torch.full((n, 1), MARK[task]), x, torch.full((n, 1), SEP), y], 1)
    return ids, y.shape[1]


def test_set(task: str, n: int = 1000, seed: int = 1234):
    return sample(task, n, torch.Generator().manual_seed(seed), split="test")


# ---------------------------------------------------------------------------------------------- models

def tiny_llama(seed: int = 0, layers: int = 4, hidden: int = 64, intermediate: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float()


def load_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def set_trainable(model, folder) -> int:
    """requires_grad from compose.json's "trainable" list (compose.freeze); returns the trainable count."""
    from compose import freeze

    freeze(model, folder)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def n_params(model, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------------ loss, accuracy

def answer_loss(model, ids: torch.Tensor, m: int) -> torch.Tensor:
    """Cross-entropy of the answer tokens (the last m), teacher-forced."""
    logits = model(input_ids=ids[:, :-1]).logits[:, -m:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, -m:].reshape(-1))


@torch.no_grad()
def evaluate(model, task: str, n: int = 1000) -> tuple[float, float]:
    """(exact-match accuracy, answer loss) on `task`'s held-out set."""
    model.eval()
    ids, m = test_set(task, n)
    accs, losses = [], []
    for i in range(0, n, 500):
        b = ids[i:i + 500]
        logits = model(input_ids=b[:, :-1]).logits[:, -m:]
        accs.append((logits.argmax(-1) == b[:, -m:]).all(1).float())
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), b[:, -m:].reshape(-1),
                                      reduction="none").view(len(b), m).mean(1))
    return torch.cat(accs).mean().item(), torch.cat(losses).mean().item()


def train(model, tasks, steps: int, *, lr: float = 3e-3, batch: int = 64, seed: int = 0, warmup: int = 50,
          log_every: int = 25, eval_tasks=(), eval_n: int = 300, weight_decay: float = 0.0):
    """AdamW with linear warmup and cosine decay on batches of `tasks` (a task name, or a list: each
    batch mixes them equally). Returns a log: step -> train loss (mean over the last `log_every` steps),
    and held-out (accuracy, loss) per eval task at the same steps."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159)).item()))
    log = {"step": [], "loss": [], "eval": {t: [] for t in eval_tasks}}
    running = []
    for step in range(1, steps + 1):
        model.train()
        loss = 0.0
        for t in tasks:
            ids, m = sample(t, batch // len(tasks), gen)
            loss = loss + answer_loss(model, ids, m) / len(tasks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % log_every == 0 or step == steps:
            log["step"].append(step)
            log["loss"].append(sum(running) / len(running))
            running = []
            for t in eval_tasks:
                log["eval"][t].append(evaluate(model, t, eval_n))
    return log


# ---------------------------------------------------------------------------------------------- output

def table(headers, rows) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3f}"
        return str(v)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def png_path(script: str) -> Path:
    return Path(_PNG) if _PNG else HERE / (Path(script).stem + ".png")


def save(fig, script: str) -> None:
    """Write the script's plot (next to it, or where --png says) and say where."""
    fig.tight_layout()
    fig.savefig(png_path(script), dpi=100)
    print(f"\nwrote {png_path(script)}")


class Timer:
    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.s = time.perf_counter() - self.t
