"""Passes over the graph IR: one module per pass, run by the PassManager."""
from compose.passes.manager import DEFAULT_PIPELINE, FUSION, REGISTRY, PassManager

__all__ = ["DEFAULT_PIPELINE", "FUSION", "REGISTRY", "PassManager"]
