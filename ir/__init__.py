"""The graph IR: architecture nodes (`nodes`, `graph`), the weight expressions behind them (`weights`),
the typed model config (`config`) and the graph-level records passes keep (`state`)."""
from compose.ir.config import DTYPES, ArchConfig, Rope
from compose.ir.graph import Graph
from compose.ir.nodes import (Adapter, Attention, CrossAttention, DecoderBlock, DenseFFN, Embedding, LMHead, MoE, Norm,
                              Layer, Op, Origin, Router, Tensors, VisionExpert)
from compose.ir.printer import graph_hash, print_graph
from compose.ir.state import CalmLayout, Cost, MoELayout, State, Target
from compose.ir.weights import (Concat, Const, Expr, Load, LowRank, Merge, Noise, Ones, Rows, Scale, Select, Slice, Stack,
                               Zeros)

__all__ = ["DTYPES", "ArchConfig", "Rope", "Graph", "Adapter", "Attention", "CrossAttention", "DecoderBlock",
           "DenseFFN", "Embedding", "LMHead", "MoE", "Norm", "Op", "Origin", "Router", "VisionExpert", "Layer", "Tensors", "graph_hash",
           "print_graph", "CalmLayout", "Cost", "MoELayout", "State", "Target", "Concat", "Const", "Expr", "Load",
           "LowRank", "Merge", "Noise", "Ones", "Rows", "Scale", "Select", "Slice", "Stack", "Zeros"]
