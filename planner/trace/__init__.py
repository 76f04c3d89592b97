"""Model → cost graph: ``trace_model`` and the graph types the solvers read."""

from planner.trace.graph import CostGraph, Layer, LayerGroup, OpCost, TiedParam
from planner.trace.tracer import layer_units, trace_model, trace_preset

__all__ = ["CostGraph", "Layer", "LayerGroup", "OpCost", "TiedParam", "layer_units", "trace_model", "trace_preset"]
