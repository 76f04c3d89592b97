"""The public entry points: ``plan(model, cluster, ...)`` and ``evaluate(model, cluster, config)``.

Both trace the model (on meta), price configurations with the cost model and return a
:class:`Plan` the runtime can execute. ``plan`` searches; ``evaluate`` prices the configuration
it is given (its stage boundaries still come from the exact partition DP unless
``partition="uniform"``).
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from planner import __version__, uncertainty
from planner.baselines import BaselineResult, run_baselines
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import LayerTable, StepPrediction, layer_table, usable_memory_bytes
from planner.cost.model import evaluate as evaluate_cost
from planner.errors import InfeasibleError, PlannerError, SpecError
from planner.graph_io import graph_to_dict
from planner.models import FAMILIES, ModelPreset, load_preset
from planner.plan import ModelInfo, ParallelConfig, Plan, Prediction, SolverReport, Stage
from planner.search import (
    Candidate,
    SearchResult,
    SearchSpace,
    check_sequence_parallel,
    partition_for,
    priced_table,
    search,
)
from planner.trace import CostGraph, trace_model

GiB = 2**30


@dataclass
class ResolvedModel:
    module: nn.Module | None  # None when the graph comes from a plan file
    preset: ModelPreset | None
    graph: CostGraph


def resolve_cluster(cluster: ClusterSpec | str, *, nodes: int | None = None,
                    devices_per_node: int | None = None) -> ClusterSpec:
    if isinstance(cluster, ClusterSpec):
        return cluster.resized(nodes=nodes, devices_per_node=devices_per_node)
    if isinstance(cluster, str):
        if cluster.endswith(".json"):
            return ClusterSpec.from_json(cluster).resized(nodes=nodes, devices_per_node=devices_per_node)
        return ClusterSpec.preset(cluster, nodes=nodes, devices_per_node=devices_per_node)
    raise SpecError("cluster", type(cluster).__name__, "pass a ClusterSpec, a preset name or a path to a JSON file")


def resolve_model(model: nn.Module | str, *, seq_len: int | None = None, sample_input: Any = None,
                  dtype: str) -> ResolvedModel:
    """Build (for a preset name) and trace the model at batch 1."""
    preset = None
    if isinstance(model, str):
        preset = load_preset(model)
        if seq_len is not None and preset.seq_len is not None and seq_len > preset.seq_len:
            raise SpecError("seq_len", seq_len, f"preset {preset.name} has {preset.seq_len} positions; "
                            f"use --seq-len <= {preset.seq_len}")
        module = preset.build(device="meta")
        inputs = sample_input if sample_input is not None else preset.sample_input(1, seq_len)
        name = preset.name
    elif isinstance(model, nn.Module):
        module = model
        if sample_input is None:
            raise SpecError("sample_input", None, "for an nn.Module, pass sample_input= (a tensor or tuple of "
                            "tensors, batch 1 is enough; meta tensors are fine) so its shapes can be traced")
        inputs = sample_input
        name = type(model).__name__
    else:
        raise SpecError("model", type(model).__name__, "pass an nn.Module or a preset name "
                        "(`python -m planner models` lists them)")
    # A preset's module was built here only to be traced: trace it in place instead of deep-copying
    # it (0.35 s, 40% of tracing GPT-3 175B); a caller's module is copied so it is left as given.
    graph = trace_model(module, inputs, name=name, dtype=dtype, seq_len=seq_len, copy_model=preset is None)
    return ResolvedModel(module=module, preset=preset, graph=graph)


def default_dtype(cluster: ClusterSpec) -> str:
    """Train in bf16 where every device lists a bf16 peak, else fp16, else fp32 (CPU processes)."""
    for dtype in ("bf16", "fp16"):
        if all(dtype in g.device.peak_flops for g in cluster.groups):
            return dtype
    return "fp32"


def _check_batch(global_batch: Any) -> int:
    if isinstance(global_batch, bool) or not isinstance(global_batch, int) or global_batch < 1:
        raise SpecError("global_batch", global_batch, "expected a positive integer number of samples per step")
    return global_batch


def plan(model: nn.Module | str, cluster: ClusterSpec | str, *, global_batch: int, seq_len: int | None = None,
         sample_input: Any = None, nodes: int | None = None, devices_per_node: int | None = None,
         space: SearchSpace | None = None, constants: CostConstants | None = None, dtype: str | None = None,
         time_limit_s: float | None = None, top_k: int = 5, baselines: bool = True,
         progress: Callable[[int, int], None] | None = None) -> Plan:
    """Search for the fastest configuration of ``model`` on ``cluster`` that fits in memory.

    With ``baselines`` (default), the plan also records the best configuration each common
    recipe (pure DP, ZeRO-3/FSDP, Megatron-LM) reaches under the same cost model.
    """
    _check_batch(global_batch)
    spec = resolve_cluster(cluster, nodes=nodes, devices_per_node=devices_per_node)
    resolved = resolve_model(model, seq_len=seq_len, sample_input=sample_input, dtype=dtype or default_dtype(spec))
    bar = None
    if progress is None and sys.stderr.isatty():  # interactive: a bar once the search passes a second
        from planner.cli import ProgressBar

        progress = bar = ProgressBar()
    try:
        return plan_resolved(resolved, spec, global_batch=global_batch, space=space, constants=constants,
                             time_limit_s=time_limit_s, top_k=top_k, baselines=baselines, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def plan_resolved(resolved: ResolvedModel, spec: ClusterSpec, *, global_batch: int,
                  space: SearchSpace | None = None, constants: CostConstants | None = None,
                  time_limit_s: float | None = None, top_k: int = 5, baselines: bool = True,
                  progress: Callable[[int, int], None] | None = None) -> Plan:
    """:func:`plan` for an already traced model (used by what-if analysis on a stored graph)."""
    _check_batch(global_batch)
    c = constants or CostConstants()
    space = runnable_space(resolved, space or SearchSpace())
    tables: dict = {}
    given = spec
    with _frozen_heap():
        spec, result, tables, orders = _search_group_orders(resolved.graph, spec, global_batch, space=space, c=c,
                                                            time_limit_s=time_limit_s, top_k=top_k, progress=progress)
        if result.best is None:
            raise _infeasible(resolved.graph, spec, global_batch, result, c)
        start = time.perf_counter()
        base = run_baselines(resolved.graph, spec, global_batch, c, table_cache=tables) if baselines else []
        baseline_s = time.perf_counter() - start
        out = build_plan(resolved, spec, result.best, c, global_batch=global_batch, result=result, baselines=base,
                         tables=tables)
    if len(orders) > 1:
        out = replace(out, explanation=out.explanation + (_group_order_note(given, spec, orders),))
    out.timings.update({"trace_s": resolved.graph.trace_time_s, "search_s": sum(r.time_s for _, r in orders),
                        "baselines_s": baseline_s})
    return out


MAX_GROUP_ORDERS = 6  # 3 distinct node groups; beyond that the cluster file's order is kept


def group_orders(spec: ClusterSpec) -> list[ClusterSpec]:
    """The cluster with its node groups in every distinct order, the file's order first.

    Ranks go group by group, so the group order decides which device type runs which pipeline
    positions: on a mixed cluster, heavy first or last layers (an embedding, an LM head) may want the
    faster devices. Orders are tried only up to :data:`MAX_GROUP_ORDERS`; with more groups, the
    file's order alone.
    """
    if spec.is_homogeneous:
        return [spec]
    seen: set[tuple] = set()
    out: list[ClusterSpec] = []
    for perm in itertools.permutations(range(len(spec.groups))):
        key = tuple(json.dumps(spec.groups[i].to_dict(), sort_keys=True) for i in perm)
        if key in seen:
            continue
        seen.add(key)
        out.append(replace(spec, groups=tuple(spec.groups[i] for i in perm)))
        if len(out) > MAX_GROUP_ORDERS:
            return [spec]
    return out


def _search_group_orders(graph: CostGraph, spec: ClusterSpec, global_batch: int, *, space: SearchSpace | None,
                         c: CostConstants, time_limit_s: float | None, top_k: int,
                         progress: Callable[[int, int], None] | None
                         ) -> tuple[ClusterSpec, SearchResult, dict, list[tuple[ClusterSpec, SearchResult]]]:
    """The search on every node-group order (:func:`group_orders`); the fastest order wins, the
    file's order on ties. Returns the chosen cluster, its result and table cache, and every order's
    result (for the explanation)."""
    orders = group_orders(spec)
    start = time.perf_counter()
    runs: list[tuple[ClusterSpec, SearchResult, dict]] = []
    for order in orders:
        left = None if time_limit_s is None else max(time_limit_s - (time.perf_counter() - start), 0.0)
        tables: dict = {}
        result = search(graph, order, global_batch, space=space, constants=c, time_limit_s=left, top_k=top_k,
                        progress=progress, table_cache=tables)
        runs.append((order, result, tables))
    feasible = [r for r in runs if r[1].best is not None]
    chosen = min(feasible, key=lambda r: r[1].best.step_time_s) if feasible else runs[0]
    return chosen[0], chosen[1], chosen[2], [(o, r) for o, r, _ in runs]


def _group_order_note(given: ClusterSpec, chosen: ClusterSpec,
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


@contextlib.contextmanager
def _frozen_heap() -> Iterator[None]:
    """Leave every object alive now (torch's modules, the traced graph) out of cyclic garbage collection.

    The search allocates millions of short-lived objects, so the collector runs hundreds of times,
    and its full passes re-scanned the millions of long-lived objects imported or traced before:
    0.6 s of a 6.5 s `plan` for GPT-3 175B (0.15 s with them frozen). Freezing them
    (:func:`gc.freeze`) changes nothing computed; reference counting still frees everything. They
    are unfrozen after, unless the caller had frozen objects itself (before a fork, say), which is
    then left as it was.
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def evaluate(model: nn.Module | str, cluster: ClusterSpec | str, config: ParallelConfig, *,
             seq_len: int | None = None, sample_input: Any = None, nodes: int | None = None,
             devices_per_node: int | None = None, constants: CostConstants | None = None, dtype: str | None = None,
             partition: str = "balanced") -> Plan:
    """Price one configuration (no search). The plan says whether it fits."""
    spec = resolve_cluster(cluster, nodes=nodes, devices_per_node=devices_per_node)
    resolved = resolve_model(model, seq_len=seq_len, sample_input=sample_input, dtype=dtype or default_dtype(spec))
    c = constants or CostConstants()
    check_config(config, resolved.graph, spec)
    if config.sequence_parallel:
        runnable_space(resolved, SearchSpace(sequence_parallel=(True,)))
    table = layer_table(resolved.graph, spec, micro_batch=config.micro_batch_size, tp=config.tp,
                        sequence_parallel=config.sequence_parallel, recompute=config.recompute, c=c)
    if partition not in ("balanced", "uniform"):
        raise SpecError("partition", partition, "use 'balanced' (exact DP) or 'uniform' (equal layers per stage)")
    part = partition_for(resolved.graph, spec, config, table, c, balanced=(partition == "balanced"))
    status = part.status
    if not part.feasible and part.status != "given":  # nothing fits: price the time-balanced split instead
        unconstrained = replace(c, allocator_usable_fraction=1e9)
        part = partition_for(resolved.graph, spec, config, table, unconstrained)
        status = "infeasible"
    pred = evaluate_cost(resolved.graph, spec, config, list(part.boundaries), c, table=table)
    cand = Candidate(config, part.boundaries, pred, status)
    return build_plan(resolved, spec, cand, c, global_batch=config.global_batch, result=None)


def runnable_space(resolved: ResolvedModel, space: SearchSpace) -> SearchSpace:
    """``space`` without sequence parallelism for a preset family whose blocks the runtime does not split along
    the sequence (``Family.sequence_parallel``); asking for it alone is an error naming the fix.

    A model without a preset (a module, a stored graph) keeps the space: it is planned, not run here.
    """
    preset = resolved.preset
    if preset is None or preset.spec.sequence_parallel or not resolved.graph.seq_len \
            or True not in space.sequence_parallel:
        return space
    if False not in space.sequence_parallel:
        raise SpecError("sequence_parallel", True, _no_sequence_parallel(preset))
    return replace(space, sequence_parallel=(False,))


def _no_sequence_parallel(preset: ModelPreset) -> str:
    families = sorted(name for name, fam in FAMILIES.items() if fam.sequence_parallel)
    return (f"the runtime splits the sequence only for the {families} families, not for {preset.family!r} "
            f"(model {preset.name}); drop --sequence-parallel")


def check_config(cfg: ParallelConfig, graph: CostGraph, cluster: ClusterSpec) -> None:
    """A hand-written configuration must match the cluster and the model."""
    from planner import schedules

    if cfg.world_size != cluster.num_devices:
        raise SpecError("dp*tp*pp", f"{cfg.dp}*{cfg.tp}*{cfg.pp}={cfg.world_size}",
                        f"the degrees must multiply to the cluster's {cluster.num_devices} devices "
                        f"({cluster.summary()}); adjust --dp/--tp/--pp or --nodes")
    dpn = min(g.devices_per_node for g in cluster.groups)
    # A tp group wider than a node is priced (its collectives cross the network every layer, which
    # the explanation says) on one device type; on a mixed cluster it could straddle two.
    if cfg.tp > dpn and not cluster.is_homogeneous:
        raise SpecError("tp", cfg.tp, f"tensor parallelism beyond one node ({dpn} devices) is not priced on a "
                        f"mixed cluster; use --tp <= {dpn}")
    if cfg.tp > dpn and cfg.tp % dpn:
        raise SpecError("tp", cfg.tp, f"a tensor-parallel group wider than a node must span whole nodes of "
                        f"{dpn} devices; use --tp {dpn * (cfg.tp // dpn)} or {dpn * (cfg.tp // dpn + 1)}")
    if cfg.sequence_parallel:
        check_sequence_parallel(graph, (True,))
    if cfg.pp * cfg.virtual_stages > graph.num_layers:
        raise SpecError("pp", cfg.pp, f"the model has {graph.num_layers} layers, fewer than pp x virtual stages "
                        f"= {cfg.pp * cfg.virtual_stages}; lower --pp or --virtual-stages")
    try:
        schedules.get_schedule(cfg.schedule).validate(cfg.pp, cfg.num_micro_batches, cfg.virtual_stages)
    except ValueError as exc:  # the message already names the field, the value and the fix
        raise PlannerError(str(exc)) from exc


def _ranks_for(pp_index: int, cfg: ParallelConfig) -> tuple[int, ...]:
    return tuple((pp_index * cfg.dp + d) * cfg.tp + t for d in range(cfg.dp) for t in range(cfg.tp))


def _candidate_table(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants,
                     tables: dict[tuple, LayerTable] | None) -> LayerTable:
    """``cfg``'s layer table, taken from ``tables`` (the search's ``table_cache``, keyed by
    ``(tp, micro-batch, sequence_parallel, recompute)``) when the search already built it.

    Building the plan needs the chosen configuration's table twice (phase times, schedule
    comparison); the search has always priced it, so neither rebuilds it.
    """
    key = (cfg.tp, cfg.micro_batch_size, cfg.sequence_parallel, cfg.recompute)
    return priced_table({} if tables is None else tables, graph, cluster, key, c)


def _prediction(cand: Candidate, cfg: ParallelConfig, graph: CostGraph, global_batch: int,
                phases: list[tuple[float, float, float]]) -> Prediction:
    pred = cand.prediction
    per_device = []
    for pp_index in range(cfg.pp):
        total = int(pred.memory_per_stage[pp_index].total)
        per_device.extend([total] * (cfg.dp * cfg.tp))
    peak_stage = max(range(cfg.pp), key=lambda d: pred.memory_per_stage[d].total)
    stages = []
    sched = pred.schedule_result
    from planner.schedules import chunk_devices

    devices = chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
    for d in range(cfg.pp):
        stages.append({
            "device_index": d,
            "time_per_step_s": pred.stage_times_s[d] * cfg.num_micro_batches,
            "memory_bytes": pred.memory_per_stage[d].as_dict(),
            "in_flight_micro_batches": float(getattr(sched, "peak_in_flight", [0] * cfg.pp)[d]) if sched else 0.0,
            "binding": pred.binding[d],
            "chunk_phase_times_s": [list(phases[j]) for j in range(len(phases)) if devices[j] == d],
        })
    return Prediction(
        step_time_s=pred.step_time_s, mfu=pred.mfu, peak_memory_bytes=int(pred.peak_memory_bytes),
        memory_per_device_bytes=tuple(per_device), fits=pred.fits,
        throughput_samples_per_s=global_batch / pred.step_time_s if pred.step_time_s > 0 else 0.0,
        time_breakdown_s=dict(pred.time_breakdown_s),
        memory_breakdown_bytes=pred.memory_per_stage[peak_stage].as_dict(), stages=tuple(stages))


def build_plan(resolved: ResolvedModel, cluster: ClusterSpec, cand: Candidate, c: CostConstants, *,
               global_batch: int, result: SearchResult | None,
               baselines: list[BaselineResult] | None = None,
               tables: dict[tuple, LayerTable] | None = None) -> Plan:
    graph = resolved.graph
    cfg = cand.config
    from planner.schedules import chunk_devices

    devices = chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
    stages = tuple(
        Stage(index=j, layer_start=a, layer_stop=b, layer_names=tuple(graph.layers[i].name for i in range(a, b)),
              ranks=_ranks_for(devices[j], cfg), virtual_chunk=j // cfg.pp, device_index=devices[j])
        for j, (a, b) in enumerate(cand.boundaries)
    )
    preset = resolved.preset
    info = ModelInfo(name=graph.name, preset=preset.name if preset else None,
                     family=preset.family if preset else None, fingerprint=graph.fingerprint(),
                     param_count=graph.param_count, num_layers=graph.num_layers,
                     layer_names=tuple(layer.name for layer in graph.layers), seq_len=graph.seq_len,
                     dtype=graph.dtype, global_batch=global_batch, flops_per_sample=graph.train_flops)
    predicted = _prediction(cand, cfg, graph, global_batch, cand.prediction.chunk_phase_times_s)
    predicted = replace(predicted, uncertainty=uncertainty.describe(
        predicted.step_time_s, predicted.time_breakdown_s, nodes=cluster.nodes, pp=cfg.pp,
        intra_link=cluster.intra_node.kind))
    if result is not None:
        top = result.top
        second = top[1].step_time_s if len(top) > 1 else math.nan
        bound = result.lower_bound_s
        gap = max(0.0, (cand.step_time_s - bound) / cand.step_time_s) if cand.step_time_s > 0 else 0.0
        solver = SolverReport(
            method="best-first enumeration + exact partition DP",
            status="time_limit" if result.timed_out and gap > 0 else "optimal",
            objective=cand.step_time_s, bound=bound, gap=gap, time_s=result.time_s)
        search_info: dict[str, Any] = {
            "evaluated": result.evaluated, "pruned": result.pruned, "infeasible": result.infeasible,
            "time_s": result.time_s, "timed_out": result.timed_out,
            "alternatives": [_alt(x) for x in top[1:]],
            "runner_up_ratio": second / cand.step_time_s if top and second == second else None,
        }
    else:
        solver = SolverReport(method="given configuration, exact partition DP", status=_status(cand),
                              objective=cand.step_time_s, bound=cand.step_time_s, gap=0.0, time_s=0.0)
        search_info = {}
    explanation = _explain(graph, cluster, cand, c)
    if cfg.pp > 1 and result is not None:
        explanation.append(_why_schedule(graph, cluster, cand, c, tables))
    placements = _placements(graph, cluster, cfg, explanation, c)
    if placements:
        search_info["intra_op"] = placements.get("solver", {})
    if baselines:
        search_info["baselines"] = [b.to_dict(cand.step_time_s) for b in baselines]
        for b in baselines:
            if b.step_time_s:
                ratio = b.step_time_s / cand.step_time_s
                if ratio > 1.0005:
                    explanation.append(f"Plan is {ratio:.2f}x faster than the best {b.name} configuration "
                                       f"({b.config}: {b.step_time_s:.4g} s/step).")
                elif ratio >= 0.9995:
                    explanation.append(f"Plan ties the best {b.name} configuration ({b.config}).")
                else:
                    explanation.append(f"The best {b.name} configuration ({b.config}: {b.step_time_s:.4g} s/step) "
                                       f"is {1 / ratio:.2f}x faster than this plan: the constraints given to the "
                                       "search (fixed degrees, schedules, ...) exclude it.")
            else:
                explanation.append(f"{b.name} cannot run this job: {b.reason}.")
    return Plan(model=info, cluster=cluster.to_dict(), cluster_fingerprint=cluster.fingerprint(), parallel=cfg,
                stages=stages, predicted=predicted, solver=solver, search=search_info,
                explanation=tuple(explanation), cost_constants=c.to_dict(), graph=graph_to_dict(graph),
                placements=placements or {},
                planner_version=__version__)


def _placements(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, explanation: list[str],
                c: CostConstants | None = None) -> dict | None:
    """Tensor splits on the tp axis: the intra-op ILP solve the search priced this tp group with.

    The layer tables took their tp communication from :func:`planner.intra_op.pricing.tp_pricing`
    (cached per graph, tp group, micro-batch, sequence parallelism, dtype and constants); the same
    cached solve becomes ``plan.placements`` here, so the prediction and the DTensor splits agree.
    When the ILP was not usable the note says the Megatron count priced it and the runtime falls
    back to its model-specific recipe. ``None`` when tp = 1.
    """
    if cfg.tp == 1:
        return None
    from planner.intra_op.pricing import tp_pricing

    pricing = tp_pricing(graph, cluster, tp=cfg.tp, micro_batch=cfg.micro_batch_size,
                         sequence_parallel=cfg.sequence_parallel, c=c or CostConstants())
    explanation.append(pricing.note())
    if pricing.source != "ilp":
        explanation.append("No intra-op placements in the plan: the runtime falls back to its model-specific "
                           "tensor-parallel plan.")
        return None
    out = pricing.placements()
    if out:
        solver = out.get("solver", {})
        styles = sorted(set((out.get("style") or {}).values()))
        explanation.append(f"Tensor splits on the tp axis from the intra-op ILP (status {solver.get('status')}, "
                           f"gap {solver.get('gap')}): module styles {', '.join(styles)}.")
    return out


def _why_schedule(graph: CostGraph, cluster: ClusterSpec, cand: Candidate, c: CostConstants,
                  tables: dict[tuple, LayerTable] | None = None) -> str:
    """The chosen schedule against the other synchronous ones at the same degrees and micro-batching."""
    from planner import schedules
    from planner.search import SYNC_DEFAULT

    cfg = cand.config
    table = _candidate_table(graph, cluster, cfg, c, tables)
    rows = []
    for name in SYNC_DEFAULT:
        info = schedules.get_schedule(name)
        v = info.chunks_per_device or (cfg.virtual_stages if name == cfg.schedule else 2 if name ==
                                        "interleaved-1f1b" else 1)
        try:
            info.validate(cfg.pp, cfg.num_micro_batches, v)
        except ValueError:
            continue
        if cfg.pp * v > graph.num_layers:
            continue
        alt = replace(cfg, schedule=name, virtual_stages=v)
        part = partition_for(graph, cluster, alt, table, c)
        if not part.feasible:
            rows.append(f"{name}: no stage split fits in memory")
            continue
        pred = evaluate_cost(graph, cluster, alt, list(part.boundaries), c, table=table)
        bubble = getattr(pred.schedule_result, "bubble_fraction", float("nan"))
        note = "" if pred.fits else ", does not fit"
        rows.append(f"{name}{f' v={v}' if v > 1 else ''}: {pred.step_time_s:.4g} s (bubble {bubble:.0%}{note})")
    chosen = cand.prediction
    bubble = getattr(chosen.schedule_result, "bubble_fraction", float("nan"))
    return (f"Schedule {cfg.schedule} chosen: {chosen.step_time_s:.4g} s per step, bubble {bubble:.0%}; at the same "
            f"degrees and micro-batching the others give " + "; ".join(r for r in rows if not r.startswith(
                f"{cfg.schedule}:") and not r.startswith(f"{cfg.schedule} ")) + ".")


def _status(cand: Candidate) -> str:
    if cand.partition_status == "infeasible" or not cand.prediction.fits:
        return "infeasible"
    return "optimal" if cand.partition_status == "optimal" else "given"


def _alt(cand: Candidate) -> dict[str, Any]:
    return {"config": cand.config.label(), "parallel": cand.config.__dict__ | {},
            "step_time_s": cand.step_time_s, "mfu": cand.prediction.mfu,
            "peak_memory_bytes": int(cand.prediction.peak_memory_bytes)}


def _explain(graph: CostGraph, cluster: ClusterSpec, cand: Candidate, c: CostConstants) -> list[str]:
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


def _infeasible(graph: CostGraph, cluster: ClusterSpec, global_batch: int, result: SearchResult,
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


def default_sample_input(preset: ModelPreset, seq_len: int | None = None) -> tuple[torch.Tensor, ...]:
    return preset.sample_input(1, seq_len)
