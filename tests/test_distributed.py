"""Data-parallel training of built models on CPU: two gloo processes, each with half of a fixed global
batch, under DDP and FSDP2 (fully_shard), take the same optimiser steps as one process with the whole
batch. Checked by the global loss of each of 3 AdamW steps (1e-5): ranks stepping on their own half's
gradient, a frozen parameter that trains or a trainable one that does not would move it. Both work for
the MoE model too (transformers 5's stacked experts are plain 3-d parameters, sharded on dim 0)."""
from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from compose import build, expand_blocks, load, moe
from dist_worker import global_batches, load_frozen, train, worker

WORLD = 2
JOBS = [("llama_pro/ddp", "llama_pro", "ddp"), ("llama_pro/fsdp2", "llama_pro", "fsdp2"),
        ("moe/ddp", "moe", "ddp"), ("moe/fsdp2", "moe", "fsdp2")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Build both models, run every job in one spawn (starting processes is the slow part), and the
    single-process references."""
    import json

    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build of torch")
    root = tmp_path_factory.mktemp("dist")
    folders = {"llama_pro": root / "llama_pro", "moe": root / "moe"}
    build(expand_blocks(load("tiny:llama?layers=4"), groups=2), folders["llama_pro"], progress=False)
    build(moe.upcycle(load("tiny:llama?layers=2"), num_experts=4, top_k=2, noise=0.02, seed=1), folders["moe"],
          progress=False)
    result = root / "result.json"
    jobs = [(name, str(folders[model]), how) for name, model, how in JOBS]
    mp.spawn(worker, args=(WORLD, free_port(), jobs, str(result)), nprocs=WORLD, join=True)
    refs = {}
    for model, folder in folders.items():
        m = load_frozen(str(folder))
        refs[model] = train(m, global_batches(m.config.vocab_size))
    return json.loads(result.read_text()), refs


@pytest.mark.parametrize("name,model,how", JOBS, ids=[j[0] for j in JOBS])
def test_data_parallel_matches_one_process(runs, name, model, how):
    got, refs = runs
    if isinstance(got[name], dict):
        pytest.fail(f"{name}: {got[name]['error']}\n{got[name]['trace']}")
    assert len(got[name]) == 3
    assert got[name] == pytest.approx(refs[model], abs=1e-5), (got[name], refs[model])
    assert len(set(refs[model])) == 3  # the steps changed the model
