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
               (transformers' ``Conv1D``, weight
               ``[in, out]``: ``Shard(1)`` is colwise,
               ``Shard(0)`` rowwise)
``vocab``      Embedding weight ``Shard(0)``        ``RowwiseParallel()`` (vocab-parallel embedding)
``sequence``   norm output split on the sequence    ``SequenceParallel()``
``replicate``  Linear / Embedding weight replicated  nothing (the module stays replicated)
=============  ===================================  ================================================

With ``options.sequence_parallel`` a ``colwise`` after a ``sequence`` norm reads ``Shard(1)``
(``ColwiseParallel(input_layouts=Shard(1))``) and a ``rowwise`` before the residual add writes it
(``RowwiseParallel(output_layouts=Shard(1))``), as torchtitan does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.errors import PlannerError, SpecError
from planner.intra_op.placement import Layout, Replicate, Shard
from planner.intra_op.pricing import (
    DEFAULT_BACKEND,
    DEFAULT_TIME_LIMIT_S,
    TP_AXIS,
    has_op_level_nodes,
    tp_pricing,
)
from planner.intra_op.solution import OpSharding, ShardingSolution
from planner.units import plural

if TYPE_CHECKING:  # the tracer imports torch; reading its graph does not need it
    from planner.trace.graph import CostGraph

_WEIGHT_STYLES = {"linear": {0: "colwise", 1: "rowwise"}, "conv1d": {1: "colwise", 0: "rowwise"},  # W [in, out]
                  "embedding": {0: "vocab", 1: "colwise"}}


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
                    sequence_parallel: bool, backend: str = DEFAULT_BACKEND, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                    constants: CostConstants | None = None) -> dict[str, Any] | None:
    """The whole model on a model-only ``tp`` mesh of ``tp`` devices for one micro-batch.

    This is the problem the joint search priced the tp group with (:func:`planner.intra_op.pricing.tp_pricing`;
    the search's :class:`planner.pricing.Pricer` keeps its solve and ``plan()`` stores that one), solved
    afresh here: no cache. Returns the JSON-ready dict described in ``docs/intra-op.md`` (``intra_op_sharding/1``
    with ``style`` and the plan's solver names), or ``None`` when ``tp == 1`` or the trace has no
    op-level nodes. Deterministic apart from the wall-clock keys (``time_s``, ``solve_time_s``,
    ``build_time_s``), which the plan file drops. Raises :class:`~planner.errors.PlannerError`
    (``SpecError`` for bad arguments, ``PlannerError`` when the ILP could not be solved) so that
    ``plan()`` can fall back to the runtime's own tensor-parallel recipe.
    """
    for name, value in (("tp", tp), ("micro_batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(name, value, "expected a positive integer")
    if tp > cluster.num_devices:
        raise SpecError("tp", tp, f"cluster {cluster.name} has {plural(cluster.num_devices, 'device')}; give at most "
                        "that")
    if tp == 1 or not has_op_level_nodes(cost_graph):
        return None
    pricing = tp_pricing(cost_graph, cluster, tp=tp, micro_batch=micro_batch, sequence_parallel=sequence_parallel,
                         c=constants or CostConstants(), backend=backend, time_limit_s=time_limit_s)
    if pricing.source != "ilp":
        raise PlannerError(f"intra-op sharding of {cost_graph.name} on tp={tp}: {pricing.reason}")
    return pricing.placements()
