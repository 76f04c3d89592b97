"""``plan_placements``: the tensor splits on a plan's ``tp`` axis, in the form the runtime applies.

The joint search fixes the degrees (dp, tp, pp); on the ``tp`` axis the runtime applies tensor
parallelism with ``parallelize_module``, and batch splitting belongs to ``dp``. So the whole model
is solved on a 1-D mesh whose only axis has the ``"model"`` role (no batch splits; every weight
that can be split is), with repeated blocks solved once (``solve_model``) and no memory limit (the
inter-op solver has already sized the stages for ``P / tp`` parameters per device).

The answer is :meth:`ShardingSolution.to_dict` plus what makes it self-describing for the
runtime: the solver report under the plan's names (``objective``, ``bound``, ``time_s``), the
micro-batch it was solved for, and ``style``, one torch ``ParallelStyle`` per module that has one:

=============  ===================================  ================================================
style          module and tp placement              ``parallelize_module`` entry
=============  ===================================  ================================================
``colwise``    Linear weight ``Shard(0)``;          ``ColwiseParallel()``
               Embedding weight ``Shard(1)``
``rowwise``    Linear weight ``Shard(1)``           ``RowwiseParallel()``
``vocab``      Embedding weight ``Shard(0)``        ``RowwiseParallel()`` (vocab-parallel embedding)
``sequence``   norm output split on the sequence    ``SequenceParallel()``
``replicate``  Linear / Embedding weight replicated  nothing (the module stays replicated)
=============  ===================================  ================================================

With ``options.sequence_parallel`` a ``colwise`` after a ``sequence`` norm reads ``Shard(1)``
(``ColwiseParallel(input_layouts=Shard(1))``) and a ``rowwise`` before the residual add writes it
(``RowwiseParallel(output_layouts=Shard(1))``), as torchtitan does.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from planner.cluster import ClusterSpec
from planner.errors import SpecError
from planner.intra_op.mesh import MeshSpec
from planner.intra_op.model import solve_model
from planner.intra_op.placement import Layout, Replicate, Shard
from planner.intra_op.solution import OpSharding, ShardingSolution

if TYPE_CHECKING:  # the tracer imports torch; reading its graph does not need it
    from planner.trace.graph import CostGraph

TP_AXIS = "tp"
# traces with one node per layer call (or one for the whole model): nothing inside a layer to shard
MODULE_LEVEL_METHODS = frozenset({"module", "module+opaque", "opaque"})
_WEIGHT_STYLES = {"linear": {0: "colwise", 1: "rowwise"}, "embedding": {0: "vocab", 1: "colwise"}}


def has_op_level_nodes(cost_graph: CostGraph) -> bool:
    """Whether the trace looks inside layers (fx / export), not one node per layer call."""
    return cost_graph.ops.number_of_nodes() > 0 and cost_graph.method not in MODULE_LEVEL_METHODS


def module_style(op: OpSharding, axis: int = 0) -> str | None:
    """The torch ``ParallelStyle`` (see the module docstring) of the module ``op`` calls, or ``None``."""
    if not op.module_path:
        return None
    if op.kind in _WEIGHT_STYLES and op.param_layouts:
        weight: Layout = next(iter(op.param_layouts.values()))  # weight first, then bias
        p = weight[axis]
        if isinstance(p, Replicate):
            return "replicate"
        return _WEIGHT_STYLES[op.kind].get(p.dim) if isinstance(p, Shard) else None
    out = op.output_layout[axis]
    if "norm" in op.kind and isinstance(out, Shard) and out.dim == 1:
        return "sequence"
    return None


def module_styles(solution: ShardingSolution, axis: str = TP_AXIS) -> dict[str, str]:
    """``{module fqn: style}`` for every Linear and Embedding module and every sequence-split norm."""
    i = solution.mesh.index(axis)
    styles: dict[str, str] = {}
    for layer in solution.layers:
        for op in layer.ops.values():
            style = module_style(op, i)
            if style is not None:
                styles[op.module_path] = style
    return styles


def plan_placements(cost_graph: CostGraph, cluster: ClusterSpec, *, tp: int, micro_batch: int,
                    sequence_parallel: bool, backend: str = "cpsat", time_limit_s: float = 10.0
                    ) -> dict[str, Any] | None:
    """Solve the whole model on a model-only ``tp`` mesh of ``tp`` devices for one micro-batch.

    Returns the JSON-ready dict described in ``docs/intra-op.md`` (``intra_op_sharding/1`` with
    ``style`` and the plan's solver names), or ``None`` when ``tp == 1`` or the trace has no
    op-level nodes. Deterministic apart from the wall-clock keys (``time_s``, ``solve_time_s``,
    ``build_time_s``), which the plan file drops. Raises :class:`~planner.errors.PlannerError`
    (``SpecError`` for bad arguments or a graph the converter cannot read, ``InfeasibleError``
    when the ILP has no answer) so that ``plan()`` can fall back to the runtime's own tensor-parallel recipe.
    """
    for name, value in (("tp", tp), ("micro_batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(name, value, "expected a positive integer")
    if tp > cluster.num_devices:
        raise SpecError("tp", tp, f"cluster {cluster.name} has {cluster.num_devices} devices; give at most that")
    if tp == 1 or not has_op_level_nodes(cost_graph):
        return None
    start = time.perf_counter()
    mesh = MeshSpec.from_cluster(cluster, {TP_AXIS: tp}, roles={TP_AXIS: "model"})
    try:
        solution = solve_model(cost_graph, mesh, cluster.device, batch_size=micro_batch,
                               memory_limit_bytes=math.inf, backend=backend, sequence_parallel=sequence_parallel,
                               time_limit_s=time_limit_s)
    except ValueError as exc:  # a trace the op-graph converter cannot read: not the caller's fault
        if isinstance(exc, SpecError):
            raise
        raise SpecError("cost_graph", cost_graph.name, f"its op graph cannot be sharded ({exc})") from exc
    out = solution.to_dict(expand_copies=False)  # 96 copies of a block would be ~0.7 MB of JSON in the plan
    out["solver"].update(objective=solution.objective_s, bound=solution.bound_s,
                         time_s=time.perf_counter() - start)
    out["options"]["micro_batch"] = micro_batch
    out["style"] = module_styles(solution)
    return out
