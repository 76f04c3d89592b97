"""Model → cost graph: ``trace_model`` / ``trace_preset``, the graph types the solvers read, profile mode."""

from planner.trace.graph import CostGraph, Layer, LayerGroup, OpCost, TiedParam
from planner.trace.profile import ProfiledTime, profile_layers
from planner.trace.tracer import layer_units, trace_model, trace_preset

__all__ = ["CostGraph", "Layer", "LayerGroup", "OpCost", "ProfiledTime", "TiedParam", "layer_units",
           "profile_layers", "trace_model", "trace_preset"]
