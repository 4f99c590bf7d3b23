"""The graph IR: architecture nodes (`nodes`, `graph`) and the weight expressions behind them (`weights`)."""
from compose.ir.graph import ArchConfig, Graph
from compose.ir.nodes import Attention, DecoderBlock, DenseFFN, Embedding, LMHead, Norm, Op, Origin
from compose.ir.printer import graph_hash, print_graph
from compose.ir.weights import Concat, Expr, Load, Merge, Noise, Rows, Scale, Slice, Zeros

__all__ = ["ArchConfig", "Graph", "Attention", "DecoderBlock", "DenseFFN", "Embedding", "LMHead", "Norm", "Op",
           "Origin", "graph_hash", "print_graph", "Concat", "Expr", "Load", "Merge", "Noise", "Rows", "Scale", "Slice",
           "Zeros"]
