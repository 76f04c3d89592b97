"""Every sentence a plan or an error says about the choice: explanations and infeasibility prose.

The search and the :class:`planner.pricing.Pricer` compute; this module only words what they
found: the configuration and its step breakdown (:func:`explain`), the schedule against the others
at the same degrees (:func:`schedule_note`), the tensor-parallel solve (:func:`placement_notes`),
the baselines (:func:`baseline_notes`), the node-group order (:func:`group_order_note`) and, when
nothing fits, what would (:func:`infeasible_error`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import StepPrediction, usable_memory_bytes
from planner.errors import InfeasibleError
from planner.intra_op.pricing import TpPricing
from planner.trace.graph import CostGraph

if TYPE_CHECKING:
    from planner.baselines import BaselineResult
    from planner.search import Candidate, ScheduleOption, SearchResult

GiB = 2**30


def explain(graph: CostGraph, cluster: ClusterSpec, cand: Candidate, c: CostConstants) -> list[str]:
    cfg, pred = cand.config, cand.prediction
    lines = [
        f"Model {graph.name}: {graph.param_count / 1e9:.3g}B parameters in {graph.num_layers} layers "
        f"({graph.group_summary()}), traced with {graph.method}.",
        f"Cluster {cluster.summary()}; usable memory per device {pred.memory_limit_bytes / GiB:.1f} GiB "
        f"({c.allocator_usable_fraction:.0%} of {cluster.device.memory_bytes / GiB:.0f} GiB minus "
        f"{c.reserved_bytes / GiB:.0f} GiB reserved).",
        f"Configuration {cfg.label()}: step {pred.step_time_s:.3f} s, MFU {pred.mfu:.1%}, "
        f"peak memory {pred.peak_memory_bytes / GiB:.1f} GiB.",
    ]
    total = pred.step_time_s or 1.0
    parts = ", ".join(f"{k} {v:.3f} s ({v / total:.0%})" for k, v in pred.time_breakdown_s.items() if v > 0)
    lines.append(f"Step time breakdown (busiest device): {parts}.")
    lines.append(f"Bottleneck stage: {pred.bottleneck_stage} ({pred.binding[pred.bottleneck_stage]}).")
    lines.extend(getattr(pred, "notes", []) or [])
    lines.extend(graph.notes)
    return lines


def schedule_note(cand: Candidate, options: list[ScheduleOption]) -> str:
    """The chosen schedule against the other synchronous ones at the same degrees and micro-batching."""
    cfg, chosen = cand.config, cand.prediction
    rows = []
    for o in options:
        if o.schedule == cfg.schedule:
            continue
        if o.step_time_s is None:
            rows.append(f"{o.schedule}: no stage split fits in memory")
            continue
        note = "" if o.fits else ", does not fit"
        rows.append(f"{o.schedule}{f' v={o.virtual_stages}' if o.virtual_stages > 1 else ''}: {o.step_time_s:.4g} s "
                    f"(bubble {o.bubble_fraction:.0%}{note})")
    bubble = getattr(chosen.schedule_result, "bubble_fraction", float("nan"))
    return (f"Schedule {cfg.schedule} chosen: {chosen.step_time_s:.4g} s per step, bubble {bubble:.0%}; at the same "
            f"degrees and micro-batching the others give " + "; ".join(rows) + ".")


def placement_notes(solve: TpPricing) -> tuple[dict[str, Any] | None, list[str]]:
    """The plan's ``placements`` from the tp solve the search priced with, and what to say about them.

    When the ILP was not usable the note says the Megatron count priced it and the runtime falls
    back to its model-specific recipe (no placements).
    """
    notes = [solve.note()]
    if solve.source != "ilp":
        notes.append("No intra-op placements in the plan: the runtime falls back to its model-specific "
                     "tensor-parallel plan.")
        return None, notes
    out = solve.placements()
    if out:
        solver = out.get("solver", {})
        styles = sorted(set((out.get("style") or {}).values()))
        notes.append(f"Tensor splits on the tp axis from the intra-op ILP (status {solver.get('status')}, "
                     f"gap {solver.get('gap')}): module styles {', '.join(styles)}.")
    return out, notes


def baseline_notes(baselines: list[BaselineResult], step_time_s: float) -> list[str]:
    """How the plan compares with the best configuration of each common recipe."""
    out = []
    for b in baselines:
        if not b.step_time_s:
            out.append(f"{b.name} cannot run this job: {b.reason}.")
            continue
        ratio = b.step_time_s / step_time_s
        if ratio > 1.0005:
            out.append(f"Plan is {ratio:.2f}x faster than the best {b.name} configuration "
                       f"({b.config}: {b.step_time_s:.4g} s/step).")
        elif ratio >= 0.9995:
            out.append(f"Plan ties the best {b.name} configuration ({b.config}).")
        else:
            out.append(f"The best {b.name} configuration ({b.config}: {b.step_time_s:.4g} s/step) "
                       f"is {1 / ratio:.2f}x faster than this plan: the constraints given to the "
                       "search (fixed degrees, schedules, ...) exclude it.")
    return out


def group_order_note(given: ClusterSpec, chosen: ClusterSpec,
                      orders: list[tuple[ClusterSpec, SearchResult]]) -> str:
    """Which node-group order the plan uses, how to launch it, and what the other orders predict."""
    def label(spec: ClusterSpec) -> str:
        return " then ".join(f"{g.nodes}x{g.devices_per_node} {g.device.name}" for g in spec.groups)

    others = "; ".join(f"{label(o)}: " + (f"{r.best.step_time_s:.4g} s" if r.best else "does not fit")
                       for o, r in orders if o is not chosen)
    if chosen.groups == given.groups:
        return f"Node-group order: the cluster file's ({label(chosen)}) is the fastest; other orders: {others}."
    return (f"Node-group order: ranks go {label(chosen)}, not the cluster file's order, because it is faster "
            f"(other orders: {others}). Launch the nodes in this order (node rank 0 = the first group's first "
            "node); the plan's cluster lists the groups in it.")



def infeasible_error(graph: CostGraph, cluster: ClusterSpec, global_batch: int, result: SearchResult,
                c: CostConstants) -> InfeasibleError:
    limit = usable_memory_bytes(cluster, c)
    if result.closest_misses:
        best = result.closest_misses[0]
        pred: StepPrediction = best.prediction
        worst = max(range(len(pred.memory_per_stage)), key=lambda d: pred.memory_per_stage[d].total)
        parts = pred.memory_per_stage[worst]
        over = parts.total - limit
        biggest = max(("weights", parts.weights), ("gradients", parts.gradients), ("optimizer", parts.optimizer),
                      ("activations", parts.activations), key=lambda kv: kv[1])
        need = (parts.total + c.reserved_bytes) / c.allocator_usable_fraction
        msg = (f"no configuration of {graph.name} fits on {cluster.summary()} with global batch {global_batch}. "
               f"Closest: {best.config.label()} needs {parts.total / GiB:.1f} GiB on pipeline stage {worst} "
               f"({over / GiB:.1f} GiB over the {limit / GiB:.1f} GiB usable); the largest part is "
               f"{biggest[0]} ({biggest[1] / GiB:.1f} GiB). It would fit on devices with "
               f"{need / GiB:.0f} GiB, or with more devices (try --nodes {cluster.nodes * 2}).")
        return InfeasibleError(msg, details={"missing_bytes": over, "stage": worst, "parts": parts.as_dict(),
                                             "config": best.config.label()})
    n = cluster.num_devices
    if result.memory_bound_misses:
        parts, cfg = result.memory_bound_misses[0]
        need = parts["total"]
        per_device = (need + c.reserved_bytes) / c.allocator_usable_fraction
        named = {k: v for k, v in parts.items() if k != "total"}
        biggest = max(named, key=named.get)
        nodes = math.ceil(cluster.nodes * need / limit)
        return InfeasibleError(
            f"no configuration of {graph.name} fits on {cluster.summary()} with global batch {global_batch}. "
            f"Closest: {cfg.label()} needs at least {need / GiB:.1f} GiB on its busiest device "
            f"({(need - limit) / GiB:.1f} GiB over the {limit / GiB:.1f} GiB usable); the largest part is "
            f"{biggest} ({named[biggest] / GiB:.1f} GiB). It would need devices with at least "
            f"{per_device / GiB:.0f} GiB, or about {nodes} nodes of these (--nodes {nodes}).",
            details={"missing_bytes": need - limit, "config": cfg.label(), "parts": named})
    total_state = graph.param_count * (c.weight_bytes + c.grad_bytes + c.optimizer_bytes)
    min_devices = math.ceil(total_state / limit)
    return InfeasibleError(
        f"no configuration of {graph.name} fits on {cluster.summary()} with global batch {global_batch}: "
        f"even fully sharded, weights + gradients + optimizer state need {total_state / GiB:.0f} GiB "
        f"({total_state / n / GiB:.1f} GiB per device on {n} devices; {limit / GiB:.1f} GiB usable), so at least "
        f"{min_devices} devices before activations. Also check that the global batch is divisible by a "
        f"feasible data-parallel degree.",
        details={"min_devices": min_devices, "state_bytes": total_state})
