"""A model folder's tokenizer files, checked where they enter (`check`), whatever the output format.

`check` runs before a folder's tokenizer files are first used: copied by the hf backend (through the
source's `extra_files`), loaded for a merged vocabulary (compose.lower.tokenizer), read for the GGUF
vocabulary (compose.backends.gguf_vocab), loaded for the text of `compose generate` and of router prompts
(compose.lower.text). A file that the tokenizers library, transformers or llama.cpp would choke on, or that
would make compose allocate by a number it holds (an added token with id 10^9), is refused with a
SourceError naming the file and the token. The raw JSON is checked first, so that nothing is sized by an id
or handed to the tokenizers library before the ids are known to be sane.

It lives in families/ because the front door, lowering and the backends all read tokenizer files, and
families is a package all three may import (imports run down the pipeline: tests/test_families.py).
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from compose.errors import SourceError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
"""A folder's tokenizer files: what a build copies with its tokenizer (besides generation_config.json)."""
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")
"""An image-text-to-text folder's processor files (image sizes, the chat template): copied with its tokenizer so
that the output loads in AutoProcessor. JSON objects that name no code (`auto_map`)."""
LOADABLE = ("tokenizer.json", "tokenizer.model", "vocab.json")
"""The files that make a folder's tokenizer loadable (tokenizer_config.json alone does not)."""
MAX_FILE_BYTES = 128 << 20
"""The largest tokenizer file compose reads: real ones are far smaller (Gemma 3's tokenizer.json, among the
largest, is 33 MB); a larger one is refused before it is read."""
SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token")
"""The special tokens transformers adds as new tokens when the vocabulary lacks them (a vocabulary larger
than the embedding)."""

_CHECKED: set[tuple] = set()
"""The folders (with their files' identities) already checked: a build asks several times."""


def has_tokenizer(folder: Path | None) -> bool:
    return folder is not None and any((folder / f).is_file() for f in LOADABLE)


def check(folder: Path) -> None:
    """Refuse `folder`'s tokenizer files, with a SourceError naming the file and what is wrong, unless each
    is a regular file of at most MAX_FILE_BYTES, tokenizer.json loads in the tokenizers library with sane
    ids and merges, and tokenizer_config.json / special_tokens_map.json are objects whose special tokens
    the vocabulary has."""
    present = {name: st for name in TOKENIZER_FILES if (st := _stat(folder / name)) is not None}
    key = (str(folder), tuple((n, st.st_ino, st.st_size, st.st_mtime_ns) for n, st in present.items()))
    if key in _CHECKED:
        return
    for name, st in present.items():
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{folder / name}: not a regular file")
        _check_size(folder / name, st.st_size)
    tokens = _check_tokenizer_json(folder / "tokenizer.json") if "tokenizer.json" in present else None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if name in present:
            _check_special_tokens(folder / name, tokens)
    _CHECKED.add(key)


def check_processor(folder: Path) -> None:
    """Refuse `folder`'s processor files unless each is a regular file of at most MAX_FILE_BYTES holding a JSON
    object that names no code of its own (an `auto_map` would make transformers run the source's code)."""
    for name in PROCESSOR_FILES:
        st = _stat(folder / name)
        if st is None:
            continue
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{folder / name}: not a regular file")
        _check_size(folder / name, st.st_size)
        data = read_json(folder / name)
        if not isinstance(data, dict):
            raise SourceError(f"{folder / name}: a JSON {type(data).__name__}, not an object")
        if "auto_map" in data:
            raise SourceError(f"{folder / name}: names code of its own (auto_map), which compose never carries "
                              "into an output")


def read_json(path: Path, what: str = "JSON"):
    """The JSON in the tokenizer file `path`, read only once its size is known to be within bounds."""
    return _parse(path, _read(path), what)


def _read(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO swapped in must not block the open
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SourceError(f"{path}: not a regular file")
        _check_size(path, st.st_size)
        raw = f.read(MAX_FILE_BYTES + 1)
    _check_size(path, len(raw))  # grown since
    return raw


def _check_size(path: Path, size: int) -> None:
    if size > MAX_FILE_BYTES:
        raise SourceError(f"{path}: {size:,} bytes, more than a tokenizer file may be ({MAX_FILE_BYTES:,})")


def _parse(path: Path, raw: bytes, what: str):
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError included
        raise SourceError(f"{path}: not valid {what} ({_first_line(e)})") from None
    except RecursionError:
        raise SourceError(f"{path}: not valid {what} (nested too deeply)") from None


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _stat(path: Path) -> os.stat_result | None:
    """The file's status (links followed); None when there is none (a dangling link counts as none, as it
    does for transformers)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None


def _show(x) -> str:
    """A value from the file, shortened for a one-line message."""
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


def _check_tokenizer_json(path: Path) -> set[str]:
    """tokenizer.json's ids and merges checked in the raw JSON, then loaded by the tokenizers library;
    returns its tokens (vocabulary and added tokens)."""
    raw = _read(path)
    data = _parse(path, raw, "tokenizer.json")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("type"), str):
        raise SourceError(f"{path}: not a tokenizers tokenizer.json (no model with a type)")
    added = data.get("added_tokens") or []
    if not isinstance(added, list) or not all(isinstance(a, dict) for a in added):
        raise SourceError(f"{path}: added_tokens is not a list of objects")
    vocab = model.get("vocab")
    unigram = model["type"] == "Unigram"  # its vocab: a list of [piece, score], whose ids are their places
    if unigram and not (isinstance(vocab, list) and all(isinstance(v, list) and v and isinstance(v[0], str)
                                                         for v in vocab)):
        raise SourceError(f"{path}: a Unigram model whose vocab is not a list of [piece, score]")
    if not unigram and not isinstance(vocab, dict):
        raise SourceError(f"{path}: a {_show(model['type'])} model whose vocab is not an object")
    tokens = {v[0] for v in vocab} if unigram else set(vocab)
    # An id is what a loader sizes its tables by: none may lie past every token the file holds.
    bound = (len(vocab) + len(added),
             f"past the {len(vocab)} vocabulary tokens and {len(added)} added tokens the file holds")
    if not unigram:
        _check_ids(path, "vocabulary token", vocab.items(), bound)
    _check_ids(path, "added token", ((a.get("content"), a.get("id")) for a in added), bound)
    if model["type"] == "BPE":
        _check_merges(path, model.get("merges", []), tokens)

    import tokenizers

    try:
        tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 -- the library raises its own exception type for any bad file
        raise SourceError(f"{path}: the tokenizers library cannot load it ({_first_line(e)})") from None
    return tokens | {a["content"] for a in added if isinstance(a.get("content"), str)}


def _check_ids(path: Path, what: str, pairs, bound: tuple[int, str]) -> None:
    """Each (token, id): an integer id, not negative, not past `bound` (the largest id, and how the message
    says it), not another token's."""
    most, past = bound
    seen: dict[int, object] = {}
    for token, i in pairs:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise SourceError(f"{path}: {what} {_show(token)} has id {_show(i)}, not a non-negative integer")
        if i > most:
            raise SourceError(f"{path}: {what} {_show(token)} has id {i}, {past}")
        if i in seen:
            raise SourceError(f"{path}: {what}s {_show(seen[i])} and {_show(token)} share id {i}")
        seen[i] = token


def _check_merges(path: Path, merges, tokens: set[str]) -> None:
    """Each BPE merge ("a b", or ["a", "b"]) is two tokens of the vocabulary."""
    if not isinstance(merges, list):
        raise SourceError(f"{path}: BPE merges are not a list")
    for m in merges:
        parts = m.split(" ") if isinstance(m, str) else m
        if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
            raise SourceError(f"{path}: BPE merge {_show(m)} is not a pair of tokens")
        for p in parts:
            if p not in tokens:
                raise SourceError(f"{path}: BPE merge {_show(m)} names {_show(p)}, which is not in the vocabulary")


def _check_special_tokens(path: Path, tokens: set[str] | None) -> None:
    """tokenizer_config.json (or special_tokens_map.json) is an object whose bos/eos/unk/pad tokens, strings
    or AddedToken objects, are tokens of tokenizer.json (`tokens`; None when there is no tokenizer.json to
    say which tokens exist)."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise SourceError(f"{path}: a JSON {type(config).__name__}, not an object")
    for field in SPECIAL:
        value = config.get(field)
        if value is None:
            continue
        token = value.get("content") if isinstance(value, dict) else value
        if not isinstance(token, str):
            raise SourceError(f"{path}: {field} is {_show(value)}, not a token (a string or an AddedToken object)")
        if tokens is not None and token not in tokens:
            raise SourceError(f"{path}: {field} {_show(token)} is in neither the vocabulary nor the added tokens "
                              f"of {path.parent / 'tokenizer.json'}")
