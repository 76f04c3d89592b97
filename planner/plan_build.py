"""The plan file from what the search found: converts, never prices.

:func:`build_plan` turns a :class:`~planner.search.Candidate` (with the search's result, the
baselines, the other schedules and the tp solve the search kept) into the :class:`~planner.plan.Plan`
the runtime reads: stages (model chunks) and their ranks (:class:`planner.layout.RankLayout`), the
prediction per pipeline device, the solver report, the tensor splits, the search report and the
explanation (:mod:`planner.explain` words it). Every block is one of the typed dataclasses of
:mod:`planner.plan` and :mod:`planner.plan_types`.
"""

from __future__ import annotations

import math
from dataclasses import replace

from planner import __version__, uncertainty
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.explain import baseline_notes, explain, placement_notes, schedule_note
from planner.graph_io import graph_to_dict
from planner.intra_op.pricing import TpPricing
from planner.plan import ModelInfo, ParallelConfig, Plan, Prediction, SolverReport, Stage
from planner.plan_types import (
    Alternative,
    BaselineRecord,
    DevicePrediction,
    SearchReport,
    TensorSplits,
)
from planner.resolve import ResolvedModel
from planner.schedules import chunk_devices
from planner.search import Candidate, ScheduleOption, SearchResult
from planner.trace import CostGraph


def _prediction(cand: Candidate, cfg: ParallelConfig, graph: CostGraph, global_batch: int,
                phases: list[tuple[float, float, float]]) -> Prediction:
    pred = cand.prediction
    per_rank = []
    for pp_index in range(cfg.pp):
        total = int(pred.memory_per_device[pp_index].total)
        per_rank.extend([total] * (cfg.dp * cfg.cp * cfg.tp))  # the ranks of one pipeline position
    peak_device = max(range(cfg.pp), key=lambda d: pred.memory_per_device[d].total)
    sched = pred.schedule_result
    devices = chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
    per_device = tuple(
        DevicePrediction(
            device_index=d, time_per_step_s=pred.device_times_s[d] * cfg.num_micro_batches,
            memory_bytes=pred.memory_per_device[d].as_dict(),
            in_flight_micro_batches=float(getattr(sched, "peak_in_flight", [0] * cfg.pp)[d]) if sched else 0.0,
            binding=pred.binding[d],
            chunk_phase_times_s=tuple(tuple(phases[j]) for j in range(len(phases)) if devices[j] == d))
        for d in range(cfg.pp))
    return Prediction(
        step_time_s=pred.step_time_s, mfu=pred.mfu, peak_memory_bytes=int(pred.peak_memory_bytes),
        memory_per_device_bytes=tuple(per_rank), fits=pred.fits,
        throughput_samples_per_s=global_batch / pred.step_time_s if pred.step_time_s > 0 else 0.0,
        time_breakdown_s=dict(pred.time_breakdown_s),
        memory_breakdown_bytes=pred.memory_per_device[peak_device].as_dict(), devices=per_device)


def build_plan(resolved: ResolvedModel, cluster: ClusterSpec, cand: Candidate, c: CostConstants, *,
               global_batch: int, result: SearchResult | None, baselines: list[BaselineRecord] | None = None,
               schedule_options: list[ScheduleOption] | None = None, tp_solve: TpPricing | None = None) -> Plan:
    """The plan file of ``cand``: converts what the search (or :func:`price_config`) computed, prices nothing.

    ``schedule_options``: the other schedules at its degrees (:func:`planner.search.compare_schedules`);
    ``tp_solve``: the intra-op ILP solve its tp group was priced with (its placements).
    """
    graph, cfg = resolved.graph, cand.config
    devices, layout = chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages), cfg.layout
    stages = tuple(
        Stage(index=j, layer_start=a, layer_stop=b, layer_names=tuple(graph.layers[i].name for i in range(a, b)),
              ranks=layout.position_ranks(devices[j]), virtual_chunk=j // cfg.pp, device_index=devices[j])
        for j, (a, b) in enumerate(cand.boundaries)
    )
    preset = resolved.preset
    info = ModelInfo(name=graph.name, preset=preset.name if preset else None,
                     family=preset.family if preset else None, fingerprint=graph.fingerprint(),
                     param_count=graph.param_count, num_layers=graph.num_layers,
                     layer_names=tuple(layer.name for layer in graph.layers), seq_len=graph.seq_len,
                     dtype=graph.dtype, global_batch=global_batch, flops_per_sample=graph.train_flops,
                     sample_input=resolved.sample_spec)
    predicted = _prediction(cand, cfg, graph, global_batch, cand.prediction.chunk_phase_times_s)
    predicted = replace(predicted, uncertainty=uncertainty.describe(
        predicted.step_time_s, predicted.time_breakdown_s, nodes=cluster.nodes, pp=cfg.pp, tp=cfg.tp,
        intra_link=cluster.intra_node.kind))
    solver, search = _solver_report(cand, result)
    explanation = explain(graph, cluster, cand, c)
    if note := split_search_note(cand):
        explanation.append(note)
    if cfg.pp > 1 and result is not None:
        explanation.append(schedule_note(cand, schedule_options or []))
    splits = TensorSplits()
    if tp_solve is not None:
        placements, notes = placement_notes(tp_solve)
        explanation.extend(notes)
        if placements:
            splits = TensorSplits.from_dict(placements)
            search = replace(search, intra_op=splits.solver)
    if baselines:
        search = replace(search, baselines=tuple(
            replace(b, speedup_of_plan=b.step_time_s / cand.step_time_s) if b.step_time_s else b for b in baselines))
        explanation.extend(baseline_notes(baselines, cand.step_time_s))
    return Plan(model=info, cluster=cluster, cluster_fingerprint=cluster.fingerprint(), parallel=cfg,
                stages=stages, predicted=predicted, solver=solver, search=search,
                explanation=tuple(explanation), cost_constants=c.to_dict(), graph=graph_to_dict(graph),
                placements=splits, planner_version=__version__)


def _solver_report(cand: Candidate, result: SearchResult | None) -> tuple[SolverReport, SearchReport]:
    """How the configuration was found: the search's status, bound, gap and counters (or "given")."""
    if result is None:
        return SolverReport(method="given configuration, exact partition DP" + _polish_words(cand),
                            status=_status(cand), objective=cand.step_time_s, bound=cand.step_time_s, gap=0.0,
                            time_s=0.0), SearchReport()
    top = result.top
    second = top[1].step_time_s if len(top) > 1 else math.nan
    bound = result.lower_bound_s
    gap = max(0.0, (cand.step_time_s - bound) / cand.step_time_s) if cand.step_time_s > 0 else 0.0
    solver = SolverReport(
        method="best-first enumeration + exact partition DP" + _polish_words(cand),
        status="time_limit" if result.timed_out and gap > 0 else "optimal",
        objective=cand.step_time_s, bound=bound, gap=gap, time_s=result.time_s)
    search = SearchReport(
        evaluated=result.evaluated, pruned=result.pruned, infeasible=result.infeasible, time_s=result.time_s,
        timed_out=result.timed_out, alternatives=tuple(_alt(x) for x in top[1:]),
        runner_up_ratio=second / cand.step_time_s if top and second == second else None)
    return solver, search


def _polish_words(cand: Candidate) -> str:
    """The solver report's words for local search on the split, where it ran (pp > 1)."""
    return " + local search on the simulated step" if cand.split_evaluations else ""


def split_search_note(cand: Candidate) -> str | None:
    """The plan's line on the stage split local search moved away from the exact solver's, or None."""
    if cand.split_gain <= 0:
        return None
    return (f"stages: the exact solver's split (least (m-1)·slowest + sum of stage times) moved by local "
            f"search on the simulated step, {cand.split_gain:.1%} shorter ({cand.split_evaluations} splits "
            f"priced; docs/inter-op.md)")


def _status(cand: Candidate) -> str:
    if cand.partition_status == "infeasible" or not cand.prediction.fits:
        return "infeasible"
    return "optimal" if cand.partition_status == "optimal" else "given"


def _alt(cand: Candidate) -> Alternative:
    return Alternative(config=cand.config.label(), parallel=cand.config, step_time_s=cand.step_time_s,
                       mfu=cand.prediction.mfu, peak_memory_bytes=int(cand.prediction.peak_memory_bytes))
