"""Sanity bounds on what a spec may ask for, checked before the graph is built.

A typo such as `per_group: 1000000000` must be refused in milliseconds, not hang `inspect` while a
billion nodes are made. The bounds sit far above any model people build (Llama 3.1 405B has 126 layers,
DeepSeek-V3 256 routed experts in each of 58 MoE layers); what a build writes is bounded separately, by
its computed size against the free disk (compose.pipeline).
"""
from __future__ import annotations

from compose.errors import SpecError

MAX_LAYERS = 1024
MAX_EXPERTS = 1024
MAX_EXPERT_FFNS = 1 << 16
"""Experts summed over every MoE layer."""
MAX_MERGE_INPUTS = 1024


def check_layers(n: int, field: str, what: str) -> None:
    if n > MAX_LAYERS:
        raise SpecError(f"{field}: {what} make {n:,} layers, more than compose builds ({MAX_LAYERS})")


def check_experts(per_layer: int, layers: int, field: str) -> None:
    if per_layer > MAX_EXPERTS:
        raise SpecError(f"{field}: {per_layer:,} experts per layer is more than compose builds ({MAX_EXPERTS})")
    if per_layer * layers > MAX_EXPERT_FFNS:
        raise SpecError(f"{field}: {per_layer:,} experts in each of {layers} layers make {per_layer * layers:,} "
                        f"expert FFNs, more than compose builds ({MAX_EXPERT_FFNS:,})")


def check_merge_inputs(n: int, field: str) -> None:
    if n > MAX_MERGE_INPUTS:
        raise SpecError(f"{field}: {n:,} models is more than compose merges at once ({MAX_MERGE_INPUTS})")
