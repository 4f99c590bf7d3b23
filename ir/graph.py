"""The architecture graph: typed ops joined by hidden-state edges, over a networkx DiGraph.

A Graph is treated as a value: passes never mutate one, they build a new one with `replace`/`remove`.
The live model is the path from the Embedding to the LMHead (the main chain), plus the side chains that
feed it through `cross` edges (CALM's augmenting model: `augment.embed -> augment.layers.0 -> ...`, with
edges from its blocks into the main chain's CrossAttention nodes). A side chain has its own ArchConfig
in `side_configs`. Nodes that feed nothing live (layers a slice did not take, augmenting layers above the
last connection) stay in the graph until dead-weight elimination removes them, so a dump shows them.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import networkx as nx

from compose.errors import IRError
from compose.ir.config import ArchConfig
from compose.ir.nodes import Adapter, Block, DecoderBlock, Embedding, Layer, LMHead, Norm, Op, Tensors
from compose.ir.state import State


NEXT, CROSS = "next", "cross"
"""Edge kinds: `next` carries the residual stream along a chain; `cross` carries a side chain's hidden
states into a node of another chain (CALM's cross-attention reads them)."""


class Graph:
    def __init__(self, config: ArchConfig, nodes: Iterable[tuple[str, Op]],
                 edges: Iterable[tuple[str, str] | tuple[str, str, str]], state: State | None = None,
                 side_configs: dict[str, ArchConfig] | None = None):
        self.config = config
        self.side_configs: dict[str, ArchConfig] = dict(side_configs or {})
        self.state: State = state or State()
        self._g = nx.DiGraph()
        for name, op in nodes:
            if name in self._g:
                raise IRError(f"node {name} is defined twice")
            self._g.add_node(name, op=op)
        for a, b, *kind in edges:
            if a not in self._g or b not in self._g:
                raise IRError(f"edge {a} -> {b} names a node that does not exist")
            self._g.add_edge(a, b, kind=kind[0] if kind else NEXT)

    # -- reading -------------------------------------------------------------------------------------
    @property
    def nx(self) -> nx.DiGraph:
        """The underlying networkx graph (read it; build new Graphs to change it)."""
        return self._g

    def op(self, name: str) -> Op:
        return self._g.nodes[name]["op"]

    def names(self) -> list[str]:
        """All nodes: the main chain in order, the side chains in order, then the rest in insertion order."""
        chains = self.chain() + [n for c in self.side_chains().values() for n in c]
        on = set(chains)
        return chains + [n for n in self._g.nodes if n not in on]

    def edges(self) -> list[tuple[str, str, str]]:
        """(from, to, kind) for every edge."""
        return [(a, b, d["kind"]) for a, b, d in self._g.edges(data=True)]

    def items(self) -> Iterator[tuple[str, Op]]:
        for n in self.names():
            yield n, self.op(n)

    def _path(self, start: str) -> list[str]:
        path, node, seen = [start], start, {start}
        while True:
            succ = [b for b in self._g.successors(node) if self._g.edges[node, b]["kind"] == NEXT]
            if not succ:
                return path
            if len(succ) > 1:
                raise IRError(f"node {node} feeds {len(succ)} nodes; a decoder chain feeds one")
            node = succ[0]
            if node in seen:
                raise IRError(f"node {node} is on a cycle")
            seen.add(node)
            path.append(node)

    def chain(self) -> list[str]:
        """The main hidden-state path: from the main Embedding (the one not in a side chain) to the LMHead."""
        starts = [n for n, d in self._g.nodes(data=True) if n.partition(".")[0] not in self.side_configs
                  and (isinstance(d["op"], Embedding) or (isinstance(d["op"], Tensors) and d["op"].part == "stem"))]
        if len(starts) != 1:
            raise IRError(f"the graph needs exactly one main Embedding, found {len(starts)}")
        return self._path(starts[0])

    def side_chains(self) -> dict[str, list[str]]:
        """prefix -> the side chain's path from its Embedding (`augment.embed`, `augment.layers.0`, ...)."""
        return {p: self._path(f"{p}.embed") for p in self.side_configs if f"{p}.embed" in self._g}

    def blocks(self) -> list[tuple[str, Block]]:
        """The main chain's decoder blocks (a derived family's layers), in order."""
        return [(n, op) for n in self.chain() if isinstance(op := self.op(n), (DecoderBlock, Layer))]

    @property
    def derived(self) -> bool:
        """A derived family's model (compose.families.derived): Tensors around Layers, which compose carries,
        copies and merges but does not compute with."""
        return isinstance(self.op(self.chain()[0]), Tensors)

    @property
    def tail(self) -> Tensors:
        """A derived model's tensors after its decoder stack."""
        return self.op(self.chain()[-1])  # type: ignore[return-value]

    def side_blocks(self, prefix: str) -> list[tuple[str, DecoderBlock]]:
        return [(n, op) for n in self.side_chains().get(prefix, []) if isinstance(op := self.op(n), DecoderBlock)]

    def dead(self) -> list[str]:
        """Nodes nothing live reads: off the main chain and not upstream of it through any edge."""
        last = self.chain()[-1]  # every live node is upstream of the head
        live = nx.ancestors(self._g, last) | {last}
        return [n for n in self._g.nodes if n not in live]

    @property
    def embedding(self) -> Embedding | Tensors:
        """The main chain's first node: its Embedding (a derived model's stem Tensors)."""
        return self.op(self.chain()[0])  # type: ignore[return-value]

    @property
    def final_norm(self) -> Norm:
        return next(op for _, op in self.items() if isinstance(op, Norm))  # type: ignore[return-value]

    @property
    def head(self) -> LMHead:
        return next(op for _, op in self.items() if isinstance(op, LMHead))  # type: ignore[return-value]

    # -- building new graphs -------------------------------------------------------------------------
    @property
    def composite(self) -> str | None:
        """`calm` (a second model joined by cross-attention), `cogvlm` (visual experts) or None (one model).
        No transformers class holds a composite: it is written as generated code loaded through auto_map."""
        if self.side_configs:
            return "calm"
        if any(getattr(b, "vision", None) is not None for _, b in self.blocks()):
            return "cogvlm"
        return None

    @property
    def adapter(self) -> Adapter | None:
        """CogVLM's vision adapter, when the graph has visual experts."""
        return next((op for _, op in self.items() if isinstance(op, Adapter)), None)

    # -- building new graphs -------------------------------------------------------------------------
    def replace(self, ops: dict[str, Op] | None = None, **state) -> "Graph":
        """The graph with some nodes replaced and some state records changed (`dropped=...`, `cost=...`)."""
        ops = ops or {}
        unknown = set(ops) - set(self._g.nodes)
        if unknown:
            raise IRError(f"no nodes named {sorted(unknown)}")
        nodes = [(n, ops.get(n, self.op(n))) for n in self._g.nodes]
        return Graph(self.config, nodes, self.edges(), self.state.but(**state), self.side_configs)

    def with_config(self, **changes) -> "Graph":
        """The same nodes under a changed ArchConfig (e.g. another output dtype; side chains follow it)."""
        sides = self.side_configs
        if "dtype" in changes:
            sides = {p: dataclasses.replace(c, dtype=changes["dtype"]) for p, c in sides.items()}
        return Graph(dataclasses.replace(self.config, **changes), self.items(), self.edges(), self.state, sides)

    def remove(self, names: Iterable[str]) -> "Graph":
        drop = set(names)
        nodes = [(n, self.op(n)) for n in self._g.nodes if n not in drop]
        edges = [e for e in self.edges() if e[0] not in drop and e[1] not in drop]
        return Graph(self.config, nodes, edges, self.state, self.side_configs)

    @staticmethod
    def decoder(config: ArchConfig, embed: Embedding, blocks: list[DecoderBlock], norm: Norm, head: LMHead,
                unused: list[DecoderBlock] = (), state: State | None = None) -> "Graph":
        """A decoder-only chain: embed -> layers.0 .. layers.N-1 -> norm -> lm_head (+ unused blocks)."""
        names = ["embed"] + [f"layers.{i}" for i in range(len(blocks))] + ["norm", "lm_head"]
        ops = [embed, *blocks, norm, head]
        nodes = list(zip(names, ops)) + [(f"unused.{i}", b) for i, b in enumerate(unused)]
        return Graph(config, nodes, zip(names, names[1:]), state)

    @staticmethod
    def layered(config: ArchConfig, stem: Tensors, layers: list[Layer], tail: Tensors, unused: list[Layer] = (),
                state: State | None = None) -> "Graph":
        """A derived family's chain: stem -> layers.0 .. layers.N-1 -> tail (+ unused layers)."""
        names = ["stem"] + [f"layers.{i}" for i in range(len(layers))] + ["tail"]
        nodes = list(zip(names, [stem, *layers, tail])) + [(f"unused.{i}", b) for i, b in enumerate(unused)]
        return Graph(config, nodes, zip(names, names[1:]), state)
