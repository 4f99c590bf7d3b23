"""The graph IR: architecture nodes (`nodes`, `graph`) and the weight expressions behind them (`weights`)."""
from compose.ir.graph import ArchConfig, Graph
from compose.ir.nodes import (Attention, CrossAttention, DecoderBlock, DenseFFN, Embedding, LMHead, MoE, Norm, Op,
                              Origin, Router)
from compose.ir.printer import graph_hash, print_graph
from compose.ir.weights import Concat, Const, Expr, Load, Merge, Noise, Ones, Rows, Scale, Select, Slice, Zeros

__all__ = ["ArchConfig", "Graph", "Attention", "CrossAttention", "DecoderBlock", "DenseFFN", "Embedding", "LMHead",
           "MoE", "Norm", "Op", "Origin", "Router", "graph_hash", "print_graph", "Concat", "Const", "Expr", "Load",
           "Merge", "Noise", "Ones", "Rows", "Scale", "Select", "Slice", "Zeros"]
