"""Tensor-parallel communication per layer from the intra-op ILP, for the joint search's layer tables.

The joint search (``planner/search.py``) prices a ``tp``-way group with
:func:`planner.cost.model.layer_table`. For ``tp > 1`` it asks :func:`tp_pricing` for the seconds
of every layer's tensor-parallel collectives per micro-batch: the model is solved on a one-axis
``tp`` mesh with the ``"model"`` role (:func:`planner.intra_op.model.solve_model_ilp`: each run of
repeated blocks is one unit, solved once, with the tensors between layers priced as flows) on the
real group of the plan's tp ranks (:func:`planner.cost.comm.strided_group`), collectives priced by
:mod:`planner.cost.comm` under the search's :class:`~planner.cost.constants.CostConstants`.

:func:`tp_pricing` solves; it keeps no cache. :class:`planner.pricing.Pricer` keeps one solve per
``(tp group, micro-batch, sequence parallel, dtype)`` of its graph, cluster and constants, hands
the seconds down to :func:`planner.cost.model.layer_table` as data (:func:`ilp_layer_table`), and
builds the plan's ``placements`` from the very same solve, so the prediction and the DTensor
splits the runtime applies cannot disagree.

Phases: ``fwd`` and ``bwd`` collectives run once per micro-batch and are what the layer table
charges. ``grad_sync`` collectives (a weight replicated on the tp axis whose gradient is Partial,
e.g. the norm weights under sequence parallelism) run once per step after gradient accumulation,
as Megatron-LM's ``allreduce_layernorm_grads`` does; the per-micro-batch table does not charge
them (neither did the Megatron count) and they are reported beside the others.

When the ILP cannot be used (a trace without op-level nodes, another dtype than the trace's, a
failed or infeasible solve) the result says so (``source="megatron"``, ``reason``) and the caller
falls back to the Megatron count: never silently.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.layer_table import NO_KNOBS, LayerTable, TableKnobs, TpSeconds, layer_table
from planner.errors import PlannerError
from planner.units import plural

if TYPE_CHECKING:  # the tracer imports torch; reading its graph does not need it
    from planner.intra_op.model import ModelSolve
    from planner.trace.graph import CostGraph

TP_AXIS = "tp"
# traces with one node per layer call (or one for the whole model): nothing inside a layer to shard
MODULE_LEVEL_METHODS = frozenset({"module", "module+opaque", "opaque"})
DEFAULT_BACKEND = "cpsat"
DEFAULT_TIME_LIMIT_S = 10.0


def has_op_level_nodes(cost_graph: CostGraph) -> bool:
    """Whether the trace looks inside layers (fx / export), not one node per layer call."""
    return cost_graph.ops.number_of_nodes() > 0 and cost_graph.method not in MODULE_LEVEL_METHODS


@dataclass(frozen=True, kw_only=True)
class TpPricing:
    """Per-layer tensor-parallel seconds for one micro-batch on the tp group, and where they came from.

    ``source`` is ``"ilp"`` (the arrays hold the ILP optimum's collectives) or ``"megatron"``
    (the ILP was not usable: ``reason`` says why, the arrays are empty and the caller counts
    Megatron's all-reduces instead).
    """

    source: str
    tp: int
    micro_batch: int
    sequence_parallel: bool
    fwd_s: tuple[float, ...] = ()
    bwd_s: tuple[float, ...] = ()
    grad_sync_s: tuple[float, ...] = ()
    # per layer, the shares the solve leaves whole on every rank (ModelSolve.layer_replicated): of FLOPs,
    # parameters and saved activations (empty: every op split, Megatron's assumption)
    replicated: tuple[tuple[float, float, float], ...] = ()
    reason: str = ""
    solve: ModelSolve | None = None
    solve_time_s: float = 0.0

    @property
    def per_micro_batch_s(self) -> tuple[float, ...]:
        """Forward + backward collective seconds per layer: what the layer table charges."""
        return tuple(f + b for f, b in zip(self.fwd_s, self.bwd_s))

    def note(self) -> str:
        """One line for the plan's explanation."""
        if self.source == "ilp":
            sol = self.solve
            status = sol.result.status if sol is not None else "?"
            return (f"Tensor-parallel communication (tp={self.tp}, micro-batch {self.micro_batch}, sequence parallel "
                    f"{self.sequence_parallel}) priced by the intra-op ILP's optimum (status {status}): "
                    f"{sum(self.per_micro_batch_s) * 1e3:.4g} ms per micro-batch over all layers, plus "
                    f"{sum(self.grad_sync_s) * 1e3:.4g} ms of per-step gradient syncs on the tp axis.")
        return (f"Tensor-parallel communication (tp={self.tp}) priced with the Megatron all-reduce count, "
                f"not the intra-op ILP: {self.reason}.")

    def placements(self) -> dict[str, Any] | None:
        """The plan's ``placements`` dict (``intra_op_sharding/1`` + ``style``) of this very solve."""
        if self.solve is None:
            return None
        from planner.intra_op.placements import module_styles

        solution = self.solve.solution()
        out = solution.to_dict(expand_copies=False)  # 96 copies of a block would be ~0.7 MB of JSON in the plan
        out["solver"].update(objective=solution.objective_s, bound=solution.bound_s, time_s=self.solve_time_s)
        out["options"]["micro_batch"] = self.micro_batch
        out["style"] = module_styles(solution)
        return out


def tp_pricing(cost_graph: CostGraph, cluster: ClusterSpec, *, tp: int, micro_batch: int, sequence_parallel: bool,
               c: CostConstants, dtype: str | None = None, backend: str = DEFAULT_BACKEND,
               time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> TpPricing:
    """The ILP optimum's tensor-parallel seconds per layer (one solve, not cached), or a ``"megatron"`` fallback.

    Raises ``ValueError`` only for bad arguments; a solver failure is a fallback with a reason.
    """
    for name, value in (("tp", tp), ("micro_batch", micro_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: got {value!r}; expected a positive integer")
    return _solve(cost_graph, cluster, tp=tp, micro_batch=micro_batch, sequence_parallel=sequence_parallel,
                  c=c, dtype=dtype or cost_graph.dtype, backend=backend, time_limit_s=time_limit_s)


def ilp_layer_table(cost_graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int,
                    sequence_parallel: bool, recompute: str, c: CostConstants, dtype: str | None = None,
                    pricing: TpPricing | None = None, knobs: TableKnobs = NO_KNOBS) -> LayerTable:
    """:func:`planner.cost.model.layer_table` with the intra-op ILP's tp seconds (``pricing``, or a
    fresh :func:`tp_pricing` solve); the Megatron count, with the reason in ``tp_note``, when the ILP
    cannot be used."""
    dtype = dtype or cost_graph.dtype
    if tp > 1 and pricing is None:
        pricing = tp_pricing(cost_graph, cluster, tp=tp, micro_batch=micro_batch,
                             sequence_parallel=sequence_parallel, c=c, dtype=dtype)
    seconds, note = None, ""
    if tp > 1 and pricing is not None:
        note = pricing.note()
        if pricing.source == "ilp":
            seconds = TpSeconds(fwd_s=pricing.fwd_s, bwd_s=pricing.bwd_s, source="ilp", note=note,
                                replicated=pricing.replicated)
    return layer_table(cost_graph, cluster, micro_batch=micro_batch, tp=tp, sequence_parallel=sequence_parallel,
                       recompute=recompute, c=c, dtype=dtype, tp_seconds=seconds, tp_note=note, knobs=knobs)


def _solve(cost_graph: CostGraph, cluster: ClusterSpec, *, tp: int, micro_batch: int, sequence_parallel: bool,
           c: CostConstants, dtype: str, backend: str, time_limit_s: float) -> TpPricing:
    from planner.intra_op.mesh import MeshSpec
    from planner.intra_op.model import layers_without_ops, solve_model_ilp

    base = {"tp": tp, "micro_batch": micro_batch, "sequence_parallel": bool(sequence_parallel)}
    if tp == 1:
        return TpPricing(source="megatron", reason="tp = 1 has no tensor-parallel communication", **base)
    if not has_op_level_nodes(cost_graph):
        return TpPricing(source="megatron", reason=f"the trace ({cost_graph.method}) has no op-level nodes to shard",
                         **base)
    if dtype != cost_graph.dtype:
        return TpPricing(source="megatron", reason=f"the layer table's dtype {dtype} differs from the trace's "
                         f"{cost_graph.dtype}", **base)
    if tp > cluster.num_devices:
        raise ValueError(f"tp: got {tp}; cluster {cluster.name} has {plural(cluster.num_devices, 'device')}")
    missing = layers_without_ops(cost_graph)
    if missing:
        names = ", ".join(cost_graph.layers[i].name for i in missing[:3]) + (" ..." if len(missing) > 3 else "")
        return TpPricing(source="megatron", reason=f"{len(missing)} layers ({names}) have no op-level nodes in the "
                         "trace", **base)
    start = time.perf_counter()
    try:
        mesh = MeshSpec.from_cluster(cluster, {TP_AXIS: tp}, roles={TP_AXIS: "model"})
        solve = solve_model_ilp(cost_graph, mesh, cluster.device, batch_size=micro_batch,
                                memory_limit_bytes=math.inf, backend=backend, sequence_parallel=sequence_parallel,
                                time_limit_s=time_limit_s, constants=c)
    except (PlannerError, RuntimeError, ValueError) as exc:  # RuntimeError: both ILP backends failed
        return TpPricing(source="megatron", reason=f"the intra-op ILP failed ({type(exc).__name__}: {exc})", **base)
    comm, whole = solve.layer_comm_s(), solve.layer_replicated()
    n = cost_graph.num_layers
    phase = {p: tuple(comm.get(i, {}).get(p, 0.0) for i in range(n)) for p in ("fwd", "bwd", "grad_sync")}
    return TpPricing(source="ilp", fwd_s=phase["fwd"], bwd_s=phase["bwd"], grad_sync_s=phase["grad_sync"],
                     replicated=tuple(whole.get(i, (0.0, 0.0, 0.0)) for i in range(n)),
                     solve=solve, solve_time_s=time.perf_counter() - start, **base)
