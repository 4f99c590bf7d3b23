"""Merge methods by name. Each module of this package defines one method (or one family) and its
`METHODS`; this registry collects them, so `get("slerp")` is the whole lookup."""
from __future__ import annotations

import importlib

from compose.errors import SpecError
from compose.merges.api import Method

# module -> the methods it defines (import is lazy: torch loads only when a merge is evaluated or checked)
MODULES = {
    "linear": ["linear"],
    "slerp": ["slerp"],
    "nuslerp": ["nuslerp"],
    "multislerp": ["multislerp"],
    "karcher": ["karcher"],
    "model_stock": ["model_stock"],
    "nearswap": ["nearswap"],
    "arcee_fusion": ["arcee_fusion"],
    "passthrough": ["passthrough"],
    "task_arithmetic": ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                        "della", "della_linear"],
    "sce": ["sce"],
    "ram": ["ram", "ramplus_tl"],
}
NAMES = [n for names in MODULES.values() for n in names]
_LOADED: dict[str, Method] = {}


def get(name: str, field: str = "merge_method") -> Method:
    if name not in _LOADED:
        module = next((m for m, names in MODULES.items() if name in names), None)
        if module is None:
            raise SpecError(f"{field}: unknown merge method {name!r} (methods: {', '.join(NAMES)})")
        mod = importlib.import_module(f"compose.merges.{module}")
        for m in mod.METHODS:
            _LOADED[m.name] = m
    return _LOADED[name]
