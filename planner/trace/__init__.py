"""Model → cost graph: ``trace_model`` and the graph types the solvers read."""

from planner.trace.graph import CostGraph, Layer, OpCost, TiedParam
from planner.trace.tracer import layer_units, trace_model

__all__ = ["CostGraph", "Layer", "OpCost", "TiedParam", "layer_units", "trace_model"]
