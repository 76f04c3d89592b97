"""Intra-layer sharding: strategies per op on a 1-D or 2-D device mesh, and an ILP that picks one.

Public entry points: :func:`solve_layer` (one op graph), :func:`solve_model` (a traced model,
repeated blocks solved once), :func:`plan_placements` (the plan's ``tp`` axis, for the runtime),
:func:`op_graph_from_cost_graph` (tracer → op graph), :class:`GraphBuilder` (write an op graph by
hand). See ``docs/intra-op.md``.
"""

from planner.intra_op.builder import GraphBuilder
from planner.intra_op.collectives import Collective
from planner.intra_op.from_trace import op_graph_from_cost_graph
from planner.intra_op.graph import Op, OpGraph, Param
from planner.intra_op.mesh import MeshSpec
from planner.intra_op.model import solve_model
from planner.intra_op.placement import (
    Layout,
    Partial,
    Placement,
    Replicate,
    Shard,
    from_dims_mapping,
    placement_from_str,
    to_dims_mapping,
)
from planner.intra_op.placements import module_styles, plan_placements
from planner.intra_op.solution import LayerSharding, OpSharding, ShardingSolution
from planner.intra_op.solve import solve_layer

__all__ = [
    "Collective", "GraphBuilder", "LayerSharding", "Layout", "MeshSpec", "Op", "OpGraph", "OpSharding", "Param",
    "Partial", "Placement", "Replicate", "Shard", "ShardingSolution", "from_dims_mapping", "module_styles",
    "op_graph_from_cost_graph", "placement_from_str", "plan_placements", "solve_layer", "solve_model",
    "to_dims_mapping",
]
