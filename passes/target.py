"""Target selection: which checkpoint class the graph is written as, and the weight rewrites that class needs."""
from __future__ import annotations

from dataclasses import dataclass

from compose import families
from compose.families.base import moe_blocks, refuse_all
from compose.ir import Graph
from compose.ir.state import Target as TargetRecord
from compose.passes.base import Pass


def candidates(g: Graph) -> list[families.Family]:
    """The families that could hold `g`, in order of preference: the composite target for CALM and
    CogVLM; a dense graph's own family; for an MoE graph, its dense family's MoE classes, then the
    generated code (compose_moe) for what none of them holds exactly."""
    if g.composite:
        return [families.get(families.COMPOSITE)]
    dense = families.get(g.config.family)
    if not moe_blocks(g):
        return [dense]
    return [families.get(t) for t in dense.moe_targets] + [families.get(families.GENERATED_MOE)]


@dataclass(frozen=True)
class Target(Pass):
    """Choose the first family whose class holds the graph exactly (each family says why it cannot), record
    it in `state.target`, and apply that family's rewrites (Qwen2-MoE: a zero shared-expert gate with the
    shared down projection doubled, or a zero-width shared expert) as weight expressions, so the dump
    after this pass shows them and the hf backend only writes. Refuses, naming every candidate's reason,
    before anything is written. Leaves the IR valid and the function unchanged."""

    name = "target"

    def run(self, g: Graph) -> Graph:
        family = refuse_all(candidates(g), g)
        g = family.prepare(g)
        return g.replace(target=TargetRecord(family.model_type, family.class_name(g)))
