"""Text to token ids and back for a model folder: its own tokenizer when it has one, else bytes.

Models without tokenizer files (the built-in tiny ones) read text as bos_token_id followed by its UTF-8
bytes modulo the vocabulary: deterministic and documented, only meaningful for tests and examples.
"""
from __future__ import annotations

import json
from pathlib import Path

from compose.families.tokenizer_files import has_tokenizer


def text_tokenizer(folder: Path | None, vocab: int, bos: int | None = None, *, tokenizer=None):
    """(encode(text) -> 1-D LongTensor, decode(ids) -> str). `bos` defaults to the folder's config's;
    `tokenizer` (a transformers tokenizer) is used instead of the folder's when given."""
    import torch

    if bos is None and folder is not None and (folder / "config.json").is_file():
        bos = json.loads((folder / "config.json").read_text()).get("bos_token_id")
    if tokenizer is None and has_tokenizer(folder):
        from compose.lower.tokenizer import load_folder

        tokenizer = load_folder(folder, str(folder))  # its files checked before transformers reads them
    if tokenizer is not None:
        tok = tokenizer
        encode = lambda p: tok((tok.bos_token or "") + p, return_tensors="pt",  # noqa: E731
                               add_special_tokens=False)["input_ids"][0]
        return encode, lambda ids: tok.decode(ids)
    head = [int(bos)] if bos is not None else []

    def decode(ids: list[int]) -> str:
        return "".join(chr(i) if 32 <= i < 127 else f"<{i}>" for i in ids)

    return (lambda p: torch.tensor(head + [b % vocab for b in p.encode()], dtype=torch.long)), decode
