"""What the processes of tests/test_distributed.py run. A module of its own because
torch.multiprocessing.spawn pickles the entry point by reference: the children import it by name."""
from __future__ import annotations

import json
import os
import traceback
from datetime import timedelta

import torch

STEPS = 3
LR = 1e-2


def global_batches(vocab: int, batch: int = 4, seq: int = 16) -> torch.Tensor:
    """(STEPS, batch, seq) token ids, the same in every process."""
    return torch.randint(0, vocab, (STEPS, batch, seq), generator=torch.Generator().manual_seed(0))


def load_frozen(folder: str):
    from transformers import AutoModelForCausalLM

    from compose import freeze

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return freeze(model, folder).train()


def train(model, batches: torch.Tensor, rank: int = 0, world: int = 1) -> list[float]:
    """STEPS AdamW steps, each on this rank's share of the global batch; returns the global loss of
    each step (the mean over ranks: every rank has as many tokens, so it is the full batch's loss)."""
    import torch.distributed as dist

    from compose.training import param_groups

    opt = torch.optim.AdamW(param_groups(model, lr=LR, weight_decay=0.1))
    losses = []
    for step in range(STEPS):
        ids = batches[step].chunk(world)[rank]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        if world > 1:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(loss.item())
    return losses


def wrap(model, how: str):
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    if how == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per decoder layer, then the root (embeddings, final norm, head): the usual plan.
        for layer in model.model.layers:
            fully_shard(layer)
        return fully_shard(model)
    raise ValueError(how)


def worker(rank: int, world: int, port: int, jobs: list[tuple[str, str, str]], result: str) -> None:
    """Run every (name, folder, wrap) job on this rank; rank 0 writes {name: losses | {"error": ...}}."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two processes on a 2-core machine
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    out = {}
    try:
        for name, folder, how in jobs:
            try:
                model = load_frozen(folder)
                batches = global_batches(model.config.vocab_size)
                out[name] = train(wrap(model, how), batches, rank, world)
            except Exception as e:  # recorded for the test's skip reason; the next job still runs
                out[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            dist.barrier()
        if rank == 0:
            with open(result, "w") as f:
                json.dump(out, f)
    finally:
        dist.destroy_process_group()
