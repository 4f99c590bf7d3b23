"""Merged vocabularies, as mergekit 0.1.5 builds them (mergekit/tokenizer/build.py and embed.py).

When a merge sets `tokenizer_source` (`base`, `union` or a model), the output vocabulary is that
tokenizer's: the base model's with the tokens at or past its vocab_size stripped; for `union`, that plus
every other model's tokens, appended as added tokens; for a model, its tokenizer as it is. config.json's
vocab_size becomes the vocabulary's length, and every model's embedding and head rows are remapped onto
it by token string (one map serves both):

- a token the model has keeps that model's row;
- a token it lacks gets the row of the only model that has it; else the base model's row, when the merge
  has a base and the base has the token; else the mean of the rows of the models that have it; else zeros.

Lowering plans this from the tokenizers alone (`plan_vocab`), as `Rows` weight expressions; the hf
backend builds and writes the tokenizer from the recipe kept in the graph's state (`MergedTokenizer`, which
holds the folders it reads, so writing needs no source lookups).

mergekit leaves two orders to chance (Python set and Rust hash-map iteration): which model's tokenizer is
the base when there is no base model, and the order of the tokens `union` appends. compose fixes both:
the base model, else the first model; then models in the merge's order, each one's tokens by their id.
Every token's row equals mergekit's whatever order mergekit happened to pick.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from compose.errors import BuildError, SourceError, SpecError
from compose.families import tokenizer_files
from compose.ir.weights import Expr, Rows, Slice

TokenizerRef = Union[str, "MergedTokenizer"]
"""A model's tokenizer: the source reference whose folder holds it, or a merged one."""


def tokenizer_folder(src) -> Path | None:
    """The folder of an opened source, when it holds a loadable tokenizer (its files checked)."""
    folder = src.folder
    if not tokenizer_files.has_tokenizer(folder):
        return None
    tokenizer_files.check(folder)
    return folder


def has_tokenizer(ref: TokenizerRef | None, open_source) -> bool:
    return isinstance(ref, MergedTokenizer) or (ref is not None and tokenizer_folder(open_source(ref)) is not None)


def load(ref: TokenizerRef, open_source=None, *, fast: bool = False):
    """The tokenizer as mergekit loads it (AutoTokenizer; `use_fast=True` for the base, as it asks)."""
    if isinstance(ref, MergedTokenizer):
        return ref.build()
    folder = tokenizer_folder(open_source(ref))
    if folder is None:
        raise SourceError(f"{ref}: no tokenizer files")
    return load_folder(folder, ref, fast)


def load_folder(folder: Path, ref: str, fast: bool = False):
    """The tokenizer in `folder`, its files checked first (again, when they changed since they were
    planned from), or a SourceError naming `ref`."""
    import transformers

    tokenizer_files.check(folder)
    kwargs = {"use_fast": True} if fast else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except Exception as e:  # transformers raises anything from OSError to ValueError on a bad tokenizer
        first = (str(e).splitlines() or [""])[0]
        raise SourceError(f"{ref}: cannot load its tokenizer ({type(e).__name__}: {first})") from None


def strip(tok, vocab_size: int, ref: str):
    """mergekit's get_stripped_tokenizer: drop tokens whose id is past the model's vocab_size (padding
    tokens with no embedding row); None when there are none."""
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return None
    import tokenizers

    data = json.loads(tok._tokenizer.to_str())
    if data["model"]["type"] != "BPE":
        raise SourceError(f"{ref}: its tokenizer has {len(unused)} tokens past vocab_size {vocab_size}, and "
                          f"only BPE tokenizers can be stripped (this one is {data['model']['type']})")
    data["added_tokens"] = [e for e in data["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        data["model"]["vocab"].pop(t, None)
    data["model"]["merges"] = [m for m in data["model"]["merges"]
                               if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))
    return tok


def _digest(vocab: dict[str, int]) -> str:
    return hashlib.sha256(json.dumps(sorted(vocab.items(), key=lambda kv: kv[1])).encode()).hexdigest()


@dataclass(frozen=True)
class MergedTokenizer:
    """A tokenizer to build (graph state): the base tokenizer, stripped to `strip` ids when set; for a
    union, reloaded and extended with `tokens` and then the `added` tokens (AddedToken fields), in order.
    `size` and `digest` are the vocabulary lowering planned the rows for; writing checks them."""

    base: TokenizerRef
    folder: Path | None
    """The base's tokenizer folder (None when the base is itself a merged tokenizer)."""
    strip: int | None
    union: bool
    tokens: tuple[str, ...]
    added: tuple[tuple[tuple[str, object], ...], ...]
    generation_config: Path | None
    """The donor's generation_config.json, which travels with the merged model."""
    size: int
    digest: str

    def build(self):
        import tempfile

        import transformers
        from tokenizers import AddedToken

        tok = self.base.build() if self.folder is None else load_folder(self.folder, str(self.base), True)
        if self.strip is not None:
            tok = strip(tok, self.strip, str(self.base)) or tok
        if not self.union:
            return tok
        # mergekit saves the base and reloads it before adding tokens (not to mutate the base's object);
        # done the same way, the written files are the same too.
        with tempfile.TemporaryDirectory() as p:
            tok.save_pretrained(p, legacy_format=False, safe_serialization=True)
            res = transformers.AutoTokenizer.from_pretrained(p, use_fast=True)
        for t in self.tokens:
            res.add_tokens(t)
        for a in self.added:
            res.add_tokens(AddedToken(**dict(a)))
        return res

    def write(self, out: Path) -> list[str]:
        tok = self.build()
        if _digest(tok.get_vocab()) != self.digest:
            raise BuildError(f"tokenizer_source: the merged tokenizer built from {self.base} no longer has the "
                             "vocabulary the embeddings were remapped to (did its files change?)")
        before = set(p.name for p in out.iterdir())
        tok.save_pretrained(str(out), safe_serialization=True)
        written = sorted(set(p.name for p in out.iterdir()) - before)
        if self.generation_config is not None:
            shutil.copyfile(self.generation_config, out / self.generation_config.name)
            written.append(self.generation_config.name)
        return written

    def __str__(self) -> str:
        what = f"union over {self.base}" if self.union else f"{self.base} stripped to its vocab_size"
        return f"{what} (vocab {self.size}, sha256={self.digest[:12]})"


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary of a merge: its size, the tokenizer to write (a source reference to copy
    files from, or a MergedTokenizer), and each input's token map (`perms[i][j]`: the row input i has for
    output token j, -1 if none) with the rows that fill what an input lacks (`fill`: token -> picks)."""

    size: int
    tokenizer: TokenizerRef
    perms: tuple[tuple[int, ...], ...]
    rows: tuple[int, ...]
    fill: dict

    def remap(self, i: int, exprs: list[Expr], compute: str | None) -> Expr:
        """Input i's tensor (`exprs[i]`, vocabulary along dim 0) on the output vocabulary."""
        p, x = self.perms[i], exprs[i]
        if all(r == j for j, r in enumerate(p)):
            return x if self.rows[i] == self.size else Slice(x, 0, 0, self.size)
        picks = [[(i, r)] if r >= 0 else self.fill[j] for j, r in enumerate(p)]
        used = sorted({s for ps in picks for s, _ in ps} or {i})
        at = {s: k for k, s in enumerate(used)}
        start, src, row = [0], [], []
        for ps in picks:
            src += [at[s] for s, _ in ps]
            row += [r for _, r in ps]
            start.append(len(src))
        return Rows(tuple(exprs[s] for s in used), tuple(start), tuple(src), tuple(row), compute)


def plan_vocab(source: str, names: list[str], toks: list[TokenizerRef | None], rows: list[int],
               base: int | None, path: str, donor: TokenizerRef | None, open_source) -> VocabPlan:
    """mergekit's build_tokenizer and PermutedVocabulary for a merge of inputs `names` (their
    tokenizers `toks`, their vocab sizes `rows`), `source` being `base`, `union` or a source reference;
    `open_source` resolves a reference to its source."""
    field = f"{path}.tokenizer_source"
    tb = base if base is not None else 0  # mergekit's tokenizer base: the base model, else a first model

    def has(ref) -> bool:
        return has_tokenizer(ref, open_source)

    def folder(ref) -> Path | None:
        return None if isinstance(ref, MergedTokenizer) else tokenizer_folder(open_source(ref))

    def generation_config() -> Path | None:
        """The donor's generation_config.json (the donor: the tokenizer the merge would copy otherwise)."""
        if isinstance(donor, MergedTokenizer):
            return donor.generation_config
        where = open_source(donor).folder if donor is not None else None
        f = where / "generation_config.json" if where is not None else None
        return f if f is not None and f.is_file() else None

    def need(i: int) -> TokenizerRef:
        if not has(toks[i]):
            raise SpecError(f"{field}: {source} needs {names[i]}'s tokenizer, but {toks[i] or 'it'} has no "
                            "tokenizer files")
        return toks[i]  # type: ignore[return-value]

    try:
        base_ref = need(tb)
        base_tok = load(base_ref, open_source, fast=True)
        stripped = strip(base_tok, rows[tb], str(base_ref))
        base_tok = stripped or base_tok
        # Each model's tokenizer, loaded once; the base's stripped. mergekit assumes a model without one
        # shares the base's vocabulary; a union cannot, so there it is an error.
        loaded: dict[object, object] = {base_ref: base_tok}
        for i, ref in enumerate(toks):
            if not has(ref):
                if source == "union":
                    need(i)
            elif ref not in loaded:
                loaded[ref] = load(ref, open_source)
        vocabs = [(loaded[ref] if i != tb and ref in loaded else base_tok).get_vocab() for i, ref in enumerate(toks)]

        if source == "union":
            merged = _union(base_ref, folder(base_ref), rows[tb] if stripped is not None else None, loaded, toks,
                            rows, tb, generation_config())
            out_vocab = merged.build().get_vocab()
            merged = dataclasses.replace(merged, size=len(out_vocab), digest=_digest(out_vocab))
            tokenizer: TokenizerRef = merged if stripped or out_vocab != base_tok.get_vocab() else base_ref
        elif source == "base":
            out_vocab = base_tok.get_vocab()
            tokenizer = base_ref if stripped is None else MergedTokenizer(
                base_ref, folder(base_ref), rows[tb], False, (), (), generation_config(), len(out_vocab),
                _digest(out_vocab))
        else:
            if not has(source):
                raise SpecError(f"{field}: {source} has no tokenizer files")
            out_vocab = load(source, open_source).get_vocab()
            tokenizer = source
    except SourceError as e:
        raise SpecError(f"{field}: {e}") from None

    n = len(out_vocab)
    if sorted(out_vocab.values()) != list(range(n)):
        raise SpecError(f"{field}: the output tokenizer's ids are not 0..{n - 1} (a vocabulary with gaps)")
    by_id = sorted(out_vocab, key=out_vocab.__getitem__)
    # A token at or past a model's vocab_size has no row there: absent (where mergekit would fail on it).
    perms = tuple(tuple(v[t] if t in v and v[t] < rows[i] else -1 for t in by_id) for i, v in enumerate(vocabs))
    fill = {}
    for j in range(n):
        have = [i for i, p in enumerate(perms) if p[j] >= 0]
        if len(have) == len(perms):
            continue
        if len(have) == 1:
            fill[j] = [(have[0], perms[have[0]][j])]
        elif base is not None and perms[base][j] >= 0:
            fill[j] = [(base, perms[base][j])]
        else:  # the mean of the models that have it; none: zeros
            fill[j] = [(i, perms[i][j]) for i in have]
    return VocabPlan(n, tokenizer, perms, tuple(rows), fill)


def _union(base_ref: TokenizerRef, folder: Path | None, strip_to: int | None, loaded: dict, toks: list,
           rows: list[int], tb: int, generation_config: Path | None) -> MergedTokenizer:
    """mergekit's build_union_tokenizer, as a recipe: every model's tokens below its vocab_size, first
    seen first (the base's tokenizer first, then the merge's order; by id within one), become added tokens
    of the base tokenizer unless it has them; then the models' added tokens (special ones), first
    settings seen winning."""
    out_vocab: dict[str, None] = {}
    out_added: dict[str, object] = {}
    order = [tb] + [i for i in range(len(toks)) if i != tb]
    seen = set()
    for i in order:
        ref = base_ref if i == tb else toks[i]
        if ref in seen or ref not in loaded:
            continue
        seen.add(ref)
        tok = loaded[ref]
        for t, idx in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if idx < rows[i]:
                out_vocab.setdefault(t, None)
        for idx, info in sorted(tok.added_tokens_decoder.items()):
            if idx < rows[i] and info.content not in out_added:
                out_added[info.content] = info
    base_vocab = loaded[base_ref].get_vocab()
    tokens = tuple(t for t in out_vocab if t not in out_added and t not in base_vocab)
    added = tuple(tuple(sorted(a.__getstate__().items())) for a in out_added.values())
    return MergedTokenizer(base_ref, folder, strip_to, True, tokens, added, generation_config, 0, "")
