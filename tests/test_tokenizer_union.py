"""tokenizer_source `union`, `base` and a model when vocabularies differ: rows remapped as mergekit 0.1.5
remaps them (lower/tokenizer.py). Tiny Llama models with real tokenizers made here with the
`tokenizers` library, nothing downloaded; the peer tests compare with mergekit token by token."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from compose import build, load, merge
from compose.cli import main
from compose.ir import Rows
from compose.ir.evaluate import Evaluator
from compose.pipeline import compile_graph
from compose.sources import open_source
from conftest import read_tensors

SPECIAL = ["<unk>", "<s>", "</s>"]
# Overlapping vocabularies: a and b share w10..w19, b and c w25..w29, a and c w5; zz, yy, q1, q2 are one
# model's own. So every case of mergekit's fill rule shows up in a three-model merge.
WORDS = {
    "a": [f"w{i}" for i in range(20)],
    "b": [f"w{i}" for i in range(10, 30)] + ["zz", "yy"],
    "c": ["q1", "q2", "w5"] + [f"w{i}" for i in range(25, 40)],
}


def save_model(folder: Path, words: list[str], seed: int, extra_rows: int = 0, bpe: bool = False,
               pad_past_rows: bool = False) -> Path:
    """A tiny Llama whose embedding has a row per token (plus `extra_rows` of padding), with a word-level
    (or BPE) tokenizer; `pad_past_rows` adds a `<pad>` token with no row, as some real tokenizers have."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + words)}
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(vocab) + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    model = models.BPE(vocab, [], unk_token="<unk>") if bpe else models.WordLevel(vocab, unk_token="<unk>")
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if pad_past_rows:
        fast.add_special_tokens({"pad_token": "<pad>"})
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("vocab_zoo")
    save_model(root / "a", WORDS["a"], seed=1)
    save_model(root / "b", WORDS["b"], seed=2)
    save_model(root / "c", WORDS["c"], seed=3, extra_rows=5)  # padded: 5 rows no token uses
    save_model(root / "d", WORDS["a"], seed=4, bpe=True, pad_past_rows=True)  # a's words, a token past its rows
    shutil.copytree(root / "a", root / "a2")  # a's tokenizer, other weights
    from safetensors.torch import load_file, save_file

    w = {k: v + 0.01 for k, v in load_file(root / "a2" / "model.safetensors").items()}
    save_file(w, root / "a2" / "model.safetensors", metadata={"format": "pt"})
    return root


def vocab_of(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def rows_of(folder: Path, name: str = "model.embed_tokens.weight") -> dict[str, torch.Tensor]:
    """Token -> its row in a model folder (by the folder's own tokenizer)."""
    t = read_tensors(folder)[name]
    return {tok: t[i] for tok, i in vocab_of(folder).items() if i < t.shape[0]}


# -- the remapping math ---------------------------------------------------------------------------------

def remapped(spec) -> tuple[dict[str, int], list[torch.Tensor]]:
    """The output vocabulary and each input's remapped embedding, evaluated from the lowered IR."""
    g = compile_graph(spec)
    inputs = g.embedding.params()["weight"].inputs
    ev = Evaluator(inputs, lambda e: open_source(e.source).tensor(e.key))
    from compose.lower.tokenizer import load as load_tok

    return load_tok(g.state.tokenizer, open_source).get_vocab(), [ev(x) for x in inputs]


def test_union_rows_follow_mergekits_rule(zoo):
    a, b, c = (rows_of(zoo / m) for m in "abc")
    vocab, (ra, rb, rc) = remapped(merge.linear([load(str(zoo / m)) for m in "abc"], weights=[1, 1, 1],
                                                tokenizer_source="union"))
    assert set(vocab) == set(a) | set(b) | set(c)
    for tok, j in vocab.items():
        have = [r for r in (a, b, c) if tok in r]
        for own, out in ((a, ra), (b, rb), (c, rc)):
            if tok in own:  # a token a model has keeps its own row
                want = own[tok]
            elif len(have) == 1:  # only one model has it: that model's row
                want = have[0][tok]
            else:  # several (no base here): their mean, summed in model order
                want = sum(h[tok] for h in have) / len(have)
            assert torch.equal(out[j], want), (tok, j)
    assert torch.equal(ra[vocab["zz"]], b["zz"])  # only in b
    assert torch.equal(rb[vocab["w5"]], (a["w5"] + c["w5"]) / 2)  # in a and c, not b: their mean


def test_base_row_fills_before_the_mean(zoo):
    a, b, c = (rows_of(zoo / m) for m in "abc")
    vocab, (ra, rb, rc) = remapped(merge.task_arithmetic(base=load(str(zoo / "c")), models=[
        load(str(zoo / "a")), load(str(zoo / "b"))], weights=[0.5, 0.5], tokenizer_source="union"))
    # union: the base's (c's) vocabulary first, in its own order, then a's and b's new tokens by id
    assert [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:len(c)] == \
        sorted(c, key=vocab_of(zoo / "c").__getitem__)
    assert torch.equal(rb[vocab["w5"]], c["w5"])  # a and the base have it: the base's row, not the mean
    assert torch.equal(rc[vocab["w12"]], (a["w12"] + b["w12"]) / 2)  # the base lacks it: a and b's mean
    assert torch.equal(ra[vocab["q1"]], c["q1"])
    assert len(rc) == len(vocab)  # c's 5 padding rows are dropped


def test_union_output_is_a_loadable_tokenizer(zoo, tmp_path):
    out = build(merge.linear([load(str(zoo / m)) for m in "ab"], weights=[1, 1], tokenizer_source="union"),
                tmp_path / "out", progress=False)
    va, vb, vo = vocab_of(zoo / "a"), vocab_of(zoo / "b"), vocab_of(out)
    assert {t: vo[t] for t in va} == va  # the base's (first model's) ids are kept
    new = [t for t in sorted(vb, key=vb.__getitem__) if t not in va]
    assert [vo[t] for t in new] == list(range(len(va), len(va) + len(new)))  # b's new tokens, in b's order
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vo)
    assert read_tensors(out)["lm_head.weight"].shape[0] == len(vo)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(out))("w3 zz w25", add_special_tokens=False)["input_ids"]
    assert ids == [vo["w3"], vo["zz"], vo["w25"]]
    AutoModelForCausalLM.from_pretrained(str(out))(torch.tensor([ids]))
    again = build(merge.linear([load(str(zoo / m)) for m in "ab"], weights=[1, 1], tokenizer_source="union"),
                  tmp_path / "again", progress=False)
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (out / f).read_bytes() == (again / f).read_bytes(), f  # deterministic


def test_same_vocabulary_is_left_alone(zoo, tmp_path):
    spec = merge.linear([load(str(zoo / "a")), load(str(zoo / "a2"))], weights=[1, 1], tokenizer_source="union")
    g = compile_graph(spec)
    assert not any(isinstance(e, Rows) for e in g.embedding.params()["weight"].walk())
    assert g.state.tokenizer == str(zoo / "a")  # files copied, as for `base`
    out = build(spec, tmp_path / "out", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (zoo / "a" / "tokenizer.json").read_bytes()


def test_rows_print_in_the_ir(zoo, tmp_path, capsys):
    cfg = {"merge_method": "linear", "tokenizer_source": "union",
           "models": [{"model": str(zoo / m), "parameters": {"weight": 1.0}} for m in "ab"]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    assert main(["inspect", str(tmp_path / "m.yml")]) == 0
    text = capsys.readouterr().out
    assert "weight <- linear([rows([%0:model.embed_tokens.weight, %1:model.embed_tokens.weight], 35 rows" \
        in text
    assert "state tokenizer = union over" in text


def test_tokenizer_source_errors_name_the_field(zoo, tmp_path):
    from compose.errors import SpecError

    with pytest.raises(SpecError, match=r"model\.tokenizer_source: union needs model\.models\[1\]'s tokenizer"):
        tiny = load("tiny:llama?layers=2&hidden=32&intermediate=64&vocab=23")
        compile_graph(merge.linear([load(str(zoo / "a")), tiny], weights=[1, 1], tokenizer_source="union"))
    with pytest.raises(SpecError, match=r"model\.tokenizer_source: tiny:llama has no tokenizer files"):
        compile_graph(merge.linear([load(str(zoo / "a")), load(str(zoo / "b"))], weights=[1, 1],
                                   tokenizer_source="tiny:llama"))
    cfg = {"merge_method": "passthrough", "tokenizer_source": "union", "slices": [
        {"sources": [{"model": str(zoo / "a"), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(zoo / "b"), "layer_range": [1, 2]}]}]}
    (tmp_path / "m.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(SpecError, match="tokenizer_source: with slices, every slice must merge the same models"):
        compile_graph(str(tmp_path / "m.yml"))


# -- against mergekit -----------------------------------------------------------------------------------

def _cfg(method: str, models: list[str], ts: str, base: str | None = None, **params) -> dict:
    c = {"merge_method": method, "tokenizer_source": ts,
         "models": [{"model": m, "parameters": dict(params)} for m in models]}
    if base:
        c["base_model"] = base
    return c


PEER = {
    "union_linear": _cfg("linear", ["a", "b", "c"], "union", weight=0.4),
    "union_ties_base": _cfg("ties", ["a", "b", "c"], "union", base="c", weight=0.7, density=0.5),
    "union_slerp": {**_cfg("slerp", ["a", "b"], "union", base="a"), "parameters": {"t": [0.2, 0.7]}},
    "union_task_arithmetic_f16": {**_cfg("task_arithmetic", ["a", "b"], "union", base="b", weight=0.6),
                                  "dtype": "float16"},
    "model_c_linear": _cfg("linear", ["a", "b", "c"], "c", weight=0.5),
    "model_b_ties": _cfg("ties", ["a", "b", "c"], "b", base="a", weight=1.0, density=0.6),
    "base_stripped": _cfg("task_arithmetic", ["a", "c"], "base", base="d", weight=0.5),
    "union_stripped_base": _cfg("linear", ["d", "b"], "union", base="d", weight=0.5),
    "union_slerp_slices": {"merge_method": "slerp", "base_model": "a", "tokenizer_source": "union",
                           "parameters": {"t": 0.3}, "slices": [
                               {"sources": [{"model": m, "layer_range": [i, i + 1]} for m in "ab"]} for i in (0, 1)]},
}


def _absolute(v, root: Path):
    if isinstance(v, dict):
        ref = ("model", "base_model") + (("tokenizer_source",) if v.get("tokenizer_source") not in ("union", "base")
                                         else ())
        return {k: str(root / x) if k in ref else _absolute(x, root) for k, x in v.items()}
    if isinstance(v, list):
        return [_absolute(x, root) for x in v]
    return v


def assert_same_by_token(ours: Path, theirs: Path) -> None:
    """Same vocabulary, config vocab_size and tensors; embedding and head rows compared token by token
    (mergekit appends a union's tokens in hash order, which changes from run to run)."""
    vo, vt = vocab_of(ours), vocab_of(theirs)
    assert set(vo) == set(vt)
    n = json.loads((ours / "config.json").read_text())["vocab_size"]
    assert n == json.loads((theirs / "config.json").read_text())["vocab_size"]
    a, b = read_tensors(ours), read_tensors(theirs)
    assert sorted(a) == sorted(b)
    # A stripped tokenizer's special tokens come back on loading, past the rows: no row to compare there.
    toks = sorted(t for t in vo if vo[t] < n)
    assert toks == sorted(t for t in vt if vt[t] < n)
    for k in b:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            x, y = x[[vo[t] for t in toks]], y[[vt[t] for t in toks]]
        torch.testing.assert_close(x.float(), y.float(), rtol=1e-5, atol=1e-6 * float(y.float().abs().max()),
                                   msg=lambda m: f"{k}: {m}")


@pytest.mark.peer
@pytest.mark.parametrize("name", sorted(PEER))
def test_same_as_mergekit(zoo, tmp_path, name):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = _absolute(PEER[name], zoo)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"),
              options=MergeOptions(write_model_card=False, quiet=True))
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    assert main(["build", str(tmp_path / "merge.yml"), "-o", str(tmp_path / "compose")]) == 0
    assert_same_by_token(tmp_path / "compose", tmp_path / "mergekit")
