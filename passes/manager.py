"""The PassManager: runs named passes in order, optionally verifying after each one.

When a pass fails, or leaves the IR invalid, the error names it and the passes that ran before it.
"""
from __future__ import annotations

from typing import Callable, Sequence

from compose.errors import ComposeError, PassError
from compose.ir import Graph
from compose.ir.verify import verify
from compose.passes.base import Pass
from compose.passes.cost import Cost
from compose.passes.cse import CSE
from compose.passes.dead_weights import DeadWeights
from compose.passes.fold import Fold
from compose.passes.fuse_gate_up import FuseGateUp
from compose.passes.fuse_qkv import FuseQKV
from compose.passes.preservation import Preservation
from compose.passes.stack_experts import StackExperts
from compose.passes.target import Target
from compose.passes.trainable import Trainable
from compose.passes.verify import Verify

REGISTRY: dict[str, type[Pass]] = {p.name: p for p in (Verify, Fold, DeadWeights, Target, CSE, FuseQKV, FuseGateUp,
                                                       StackExperts, Preservation, Trainable, Cost)}
FUSION = ("fuse-qkv", "fuse-gate-up")
"""The passes that change only how the generated module computes (`compose build --no-fuse` skips them)."""
DEFAULT_PIPELINE = ("verify", "fold", "dead-weights", "target", "cse", *FUSION, "stack-experts", "preservation",
                    "trainable", "cost")


class PassManager:
    def __init__(self, names: Sequence[str] = DEFAULT_PIPELINE, verify_each: bool = False):
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            raise PassError(f"unknown pass {unknown[0]!r} (passes: {', '.join(REGISTRY)})")
        self.passes = [REGISTRY[n]() for n in names]
        self.verify_each = verify_each

    def run(self, g: Graph, after: Callable[[str, Graph], None] | None = None) -> Graph:
        done: list[str] = []
        for p in self.passes:
            try:
                g = p.run(g)
                if self.verify_each:
                    verify(g)
            except ComposeError as e:
                before = f" (after {', '.join(done)})" if done else ""
                raise type(e)(f"pass {p.name}{before}: {e}") from None
            done.append(p.name)
            if after:
                after(p.name, g)
        return g
