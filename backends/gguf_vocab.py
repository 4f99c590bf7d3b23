"""The vocabulary of a GGUF file: which llama.cpp tokenizer and pre-tokenizer a tokenizer.json is, and its
tokens, types, scores and merges.

llama.cpp splits text before byte-level BPE with the regexes of a pre-tokenizer it knows by name
(`tokenizer.ggml.pre`, looked up in src/llama-vocab.cpp). A name it does not know, or `default`, gets a
generic set of regexes that split numbers, punctuation and contractions differently from every real
tokenizer: the ids differ from transformers' on ordinary text. llama.cpp's converter names the
pre-tokenizer by hashing the ids the tokenizer gives a test text; compose reads the tokenizer.json instead
and names the split regex it holds, when it is one llama.cpp computes (PRE), and refuses the rest by name.

`decide` runs in the plan (on the source's files, before anything is written) and again on the build's
own copy when writing; both times the files are checked first (compose.families.tokenizer_files), so the
ids read here are integers no larger than the number of tokens the file holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from compose.errors import BuildError
from compose.families import tokenizer_files

PRE: dict[str, str] = {
    # Llama 3.x (and the models that reuse its tokenizer)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "llama-bpe",
    # Qwen2, Qwen2.5, Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
    # Qwen3.5
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen35",
    # Mistral NeMo's tekken
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
    r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "tekken",
}
"""Split regexes (as tokenizer.json holds them, before a ByteLevel step without its own regex) -> the name
llama.cpp 0.3.36's vocabulary loader maps to the same regex (its adapted form of this one)."""

GPT2 = "gpt-2"
"""A bare ByteLevel pre-tokenizer with its own regex: GPT-2's split, llama.cpp's `gpt-2`."""

IGNORES_MERGES = {"llama-bpe", "tekken"}
"""The pre-tokenizers for which llama.cpp's loader sets ignore_merges (a pre-token that is itself in the
vocabulary is that one token, whatever the merges would make of it); for the others it applies the merges.
tokenizer.json says which its own BPE does (`model.ignore_merges`), and a GGUF cannot say otherwise."""


@dataclass(frozen=True)
class Vocab:
    """What `decide` found: llama.cpp's tokenizer model (`none`, `gpt2` for byte-level BPE, `llama` for
    SentencePiece-style BPE) and, for byte-level BPE, its pre-tokenizer name."""

    model: str
    pre: str | None = None


NONE = Vocab("none")


def decide(folder: Path | None) -> Vocab:
    """The vocabulary llama.cpp reads for the tokenizer files in `folder`, or a BuildError naming why there
    is none (no folder: a model without a tokenizer, written as `none`)."""
    if folder is None:
        return NONE
    tokenizer_files.check(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        if (folder / "tokenizer.model").is_file():
            raise BuildError(f"--format gguf: {folder / 'tokenizer.model'} is a SentencePiece tokenizer without "
                             "tokenizer.json; compose writes GGUF vocabularies from tokenizer.json")
        return NONE
    data = _read(path)
    kind = data["model"]["type"]
    if kind != "BPE":
        raise BuildError(f"{path}: a {kind} tokenizer; compose writes GGUF vocabularies for BPE tokenizers")
    if data["model"].get("byte_fallback", False):
        return Vocab("llama")  # SentencePiece-style: llama.cpp splits on its own, no pre-tokenizer
    pre = _pre(data.get("pre_tokenizer"), path)
    ignores = bool(data["model"].get("ignore_merges", False))
    if ignores != (pre in IGNORES_MERGES):
        raise BuildError(f"{path}: its BPE {'ignores' if ignores else 'applies'} merges to words in its vocabulary "
                         f"(ignore_merges {str(ignores).lower()}), and llama.cpp's {pre!r} pre-tokenizer "
                         f"{'applies' if ignores else 'ignores'} them: llama.cpp would tokenize some words "
                         "differently; compose cannot write this tokenizer to GGUF")
    return Vocab("gpt2", pre)


def _read(path: Path) -> dict:
    """tokenizer.json, which `decide` checked (a tokenizers file, whose model has a type)."""
    return tokenizer_files.read_json(path, "tokenizer.json")


def _pre(pre, path: Path) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (see PRE), or a BuildError."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
        steps = []
    types = [s.get("type") for s in steps]
    byte_level = steps[-1] if types and types[-1] == "ByteLevel" else None
    if byte_level is not None and byte_level.get("add_prefix_space", False):
        raise BuildError(f"{path}: its ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's byte-level "
                         "BPE does not; compose cannot write this tokenizer to GGUF")
    if types == ["ByteLevel"] and byte_level.get("use_regex", True):
        return GPT2
    if (types == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True)
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert", False)):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in PRE:
            return PRE[regex]
        raise BuildError(f"{path}: a pre-tokenizer regex llama.cpp does not compute ({str(regex)[:80]!r}...); "
                         f"compose writes GGUF for the splits of {', '.join(sorted(set(PRE.values()) | {GPT2}))}, "
                         "and llama.cpp would tokenize this text differently")
    raise BuildError(f"{path}: a pre-tokenizer of {' + '.join(map(str, types)) or 'no steps'}; compose writes GGUF "
                     "for byte-level BPE split as GPT-2, Llama 3, Qwen2/2.5/3, Qwen3.5 or Mistral NeMo split "
                     "(llama.cpp would tokenize this text differently)")


def write(w, folder: Path | None, vocab_size: int) -> str:
    """Add the vocabulary `decide` finds in `folder` to the GGUFWriter `w`; returns the tokenizer model."""
    import gguf

    v = decide(folder)
    if v.model == "none":
        w.add_tokenizer_model("none")  # llama.cpp: `vocab_size` placeholder tokens, ids in and logits out
        return "none"
    path = folder / "tokenizer.json"
    if v.model == "gpt2":
        tokens, types, scores = _bpe_tokens(_read(path), path)
    else:
        try:
            hf_vocab = gguf.LlamaHfVocab(folder)
        except (FileNotFoundError, TypeError) as e:
            raise BuildError(f"{path}: a byte-fallback BPE tokenizer llama.cpp's converter does not read "
                             f"({e})") from None
        tokens, scores, types = [], [], []
        for text, score, typ in hf_vocab.all_tokens():
            tokens.append(text.decode("utf-8"))
            scores.append(score)
            types.append(int(typ))
    if len(tokens) > vocab_size:
        raise BuildError(f"{path}: {len(tokens)} tokens, more than the model's vocab_size {vocab_size}")
    for i in range(len(tokens), vocab_size):  # as the converter pads: rows the tokenizer never produces
        tokens.append(f"[PAD{i}]")
        types.append(int(gguf.TokenType.UNUSED))
        scores.append(-1000.0)
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre or "default")  # SentencePiece-style BPE: llama.cpp reads no pre-tokenizer
    w.add_token_list(tokens)
    if v.model == "llama":
        w.add_token_scores(scores)
    w.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=v.model == "gpt2", n_vocab=vocab_size)
    special.add_to_gguf(w, quiet=True)
    return v.model


def _bpe_tokens(data: dict, path: Path):
    """Byte-level BPE tokens in id order, typed as the converter types them: added special tokens CONTROL,
    other added tokens USER_DEFINED, the rest NORMAL."""
    import gguf

    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    kinds = {}
    for a in data.get("added_tokens") or []:
        by_id[a["id"]] = a["content"]
        kinds[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    n = max(by_id) + 1 if by_id else 0
    missing = [i for i in range(n) if i not in by_id]
    if missing:
        raise BuildError(f"{path}: token ids {missing[:5]} have no token; llama.cpp needs every id below {n}")
    tokens = [by_id[i] for i in range(n)]
    types = [int(kinds.get(i, gguf.TokenType.NORMAL)) for i in range(n)]
    return tokens, types, [0.0] * n
