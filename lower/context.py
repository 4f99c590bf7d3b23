"""What a lowering needs from outside the IR: model sources, and the lowering of its inputs.

Lowering never imports the front door (the spec models, compose.sources): the front door hands it a
Context. A source is any object with the Source methods (`ref`, `config`, `folder`, `keys()`, `meta(key)`,
`tensor(key)`, `extra_files()`); a spec is read by its fields.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from compose.ir.graph import Graph


@dataclass(frozen=True)
class Context:
    open: Callable[[str], Any]
    """A source reference (folder, hub id, `tiny:...`) -> the opened source; raises SourceError."""
    input: Callable[[Any, str], Graph]
    """(an input spec, its spec path) -> its graph, refused by name when it is a composite (CALM, CogVLM)
    that the op cannot take."""

