"""freeze(), param_groups() and trainable_summary() on what compose builds: the parameters with
requires_grad are exactly compose.json's `trainable` (mapped to transformers 5's in-memory names), and
an optimiser step, ours or transformers' Trainer's, moves only them."""
from __future__ import annotations

import json
import re

import pytest
import torch

from compose import ComposeError, build, calm, expand_blocks, freeze, load, moe, trainable_summary, visual_expert
from compose.training import in_memory_name, param_groups
from test_codegen import import_module

SPECS = {
    "llama_pro": lambda: expand_blocks(load("tiny:llama"), groups=4),
    "calm": lambda: calm(anchor=load("tiny:llama?layers=4"), augment=load("tiny:qwen2?layers=2&hidden=128"),
                         every=2, heads=4),
    "cogvlm": lambda: visual_expert(load("tiny:llama?layers=2"), vision_width=32),
    "moe": lambda: moe.upcycle(load("tiny:llama?layers=2"), num_experts=4, top_k=2),
    # MoE then LLaMA-Pro: only the new blocks' experts train, so the stacked experts are split by layer.
    "mixtral_pro": lambda: expand_blocks(moe.upcycle(load("tiny:llama?layers=4"), num_experts=4, top_k=2), groups=2),
    "qwen2_moe_pro": lambda: expand_blocks(moe.fine_grained(load("tiny:llama?layers=4"), segments=2, routed=4,
                                                            shared=1, top_k=2, first_k_dense=1), groups=2),
}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    out = {}
    for name, spec in SPECS.items():
        out[name] = root / name
        build(spec(), out[name], formats=["hf", "torch"], progress=False)
    return out


def load_hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True)


def load_generated(folder):
    return import_module(folder / "modeling_compose.py").ComposeForCausalLM.from_pretrained(folder)


def expected(folder) -> set[str]:
    return {in_memory_name(n) for n in json.loads((folder / "compose.json").read_text())["trainable"]}


def unfused(name: str) -> list[str]:
    for fused, parts in ((".qkv_proj.", ("q_proj", "k_proj", "v_proj")), (".gate_up_proj.", ("gate_proj", "up_proj"))):
        if fused in name and ".experts." not in name:
            return [name.replace(fused, f".{p}.") for p in parts]
    return [name]


def test_in_memory_name():
    assert in_memory_name("model.layers.3.block_sparse_moe.experts.7.w1.weight") == "model.layers.3.mlp.experts.gate_up_proj"
    assert in_memory_name("model.layers.3.block_sparse_moe.experts.7.w2.weight") == "model.layers.3.mlp.experts.down_proj"
    assert in_memory_name("model.layers.3.block_sparse_moe.gate.weight") == "model.layers.3.mlp.gate.weight"
    assert in_memory_name("model.layers.1.mlp.experts.2.up_proj.weight") == "model.layers.1.mlp.experts.gate_up_proj"
    assert in_memory_name("model.layers.1.mlp.shared_expert.up_proj.weight") == "model.layers.1.mlp.shared_expert.up_proj.weight"


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_freeze_sets_exactly_the_trainable_parameters(builds, kind):
    folder = builds[kind]
    loaders = [load_hf] if kind in ("calm", "cogvlm") else [load_hf, load_generated]
    for loader in loaders:
        model = freeze(loader(folder), folder)
        got = {n for n, p in model.named_parameters() if p.requires_grad}
        if loader is load_generated:  # the fusion passes' qkv_proj and gate_up_proj hold the checkpoint's parts
            got = {p for n in got for p in unfused(n)}
            assert any("qkv_proj" in n for n, _ in model.named_parameters())
        assert got == expected(folder), loader.__name__
        if kind in ("llama_pro", "calm", "mixtral_pro", "qwen2_moe_pro"):
            assert 0 < len(got) < len(list(model.parameters()))


@pytest.mark.parametrize("kind", ["llama_pro", "calm", "moe", "mixtral_pro"])
def test_one_adamw_step_moves_only_trainable(builds, kind):
    folder = builds[kind]
    model = freeze(load_hf(folder), folder).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, weight_decay=0.1))
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    train = expected(folder)
    # Identity-initialised blocks (zero o_proj/down_proj) give the rest of a new block zero gradient at
    # the first step, so not every trainable tensor moves yet; every one gets a gradient.
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and moved <= train
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in train), n


def test_param_groups_decay_matrices_only(builds):
    folder = builds["llama_pro"]
    model = load_hf(folder)
    decay, no_decay = param_groups(model, folder, lr=3e-4, weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 3e-4
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(expected(folder))
    assert "lr" not in param_groups(model)[0]  # without lr the optimiser's default applies


def test_unknown_names_are_an_error(builds, tmp_path):
    folder = builds["llama_pro"]
    model = load_hf(folder)
    manifest = json.loads((folder / "compose.json").read_text())
    manifest["trainable"] += ["model.layers.99.mlp.up_proj.weight", "cross.0.q_proj.weight"]
    (tmp_path / "compose.json").write_text(json.dumps(manifest))
    with pytest.raises(ComposeError, match=r"model\.layers\.99\.mlp\.up_proj\.weight, cross\.0\.q_proj\.weight|"
                                           r"cross\.0\.q_proj\.weight"):
        freeze(model, tmp_path)
    with pytest.raises(ComposeError, match="compose.json"):
        freeze(model, tmp_path / "nowhere")


def test_tied_embeddings_counted_once(tmp_path):
    """tiny:qwen2 ties lm_head to the embedding: naming either trains the one shared matrix."""
    out = tmp_path / "tied"
    build(expand_blocks(load("tiny:qwen2?layers=2"), groups=1), out, progress=False)
    model = load_hf(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    manifest = json.loads((out / "compose.json").read_text())
    manifest["trainable"] = ["lm_head.weight"]
    (out / "compose.json").write_text(json.dumps(manifest))
    freeze(model, out)
    emb = model.model.embed_tokens.weight
    assert emb.requires_grad and sum(p.requires_grad for p in model.parameters()) == 1
    total = sum(p.numel() for p in model.parameters())
    assert trainable_summary(model) == (f"trainable params: {emb.numel():,} || all params: {total:,} || "
                                        f"trainable%: {100 * emb.numel() / total:.2f}")


def test_summary_format(builds):
    model = freeze(load_hf(builds["llama_pro"]), builds["llama_pro"])
    assert re.fullmatch(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d\d",
                        trainable_summary(model))
    cost = json.loads((builds["llama_pro"] / "compose.json").read_text())["cost"]
    assert f"trainable params: {cost['trainable_params']:,} ||" in trainable_summary(model)


@pytest.mark.parametrize("optimiser", ["trainer's", "param_groups"])
def test_trainer_with_freeze(builds, tmp_path, optimiser):
    """transformers' Trainer builds its optimiser from the parameters with requires_grad, or takes ours."""
    from transformers import Trainer, TrainingArguments

    folder = builds["llama_pro"]
    model = freeze(load_hf(folder), folder)
    opt = torch.optim.AdamW(param_groups(model, lr=1e-2, weight_decay=0.1)) if optimiser == "param_groups" else None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, model.config.vocab_size, (8, 16), generator=g)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, max_steps=3,
                             per_device_train_batch_size=4, learning_rate=1e-2, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    train = expected(folder)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= train
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if n not in train)
