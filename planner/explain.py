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
from planner.cost.context_parallel import cp_step_note
from planner.cost.memory import model_state_bytes
from planner.cost.model import StepPrediction, usable_memory_bytes
from planner.cost.sharding import keeps_unsharded_grads
from planner.errors import InfeasibleError
from planner.intra_op.pricing import TpPricing
from planner.schedules import chunk_devices
from planner.trace.graph import CostGraph
from planner.trace.tracer import attention_kind
from planner.units import format_count, plural

if TYPE_CHECKING:
    from planner.plan import ParallelConfig
    from planner.plan_types import BaselineRecord
    from planner.search import Candidate, ScheduleOption, SearchResult
    from planner.space import SearchSpace

GiB = 2**30


def explain(graph: CostGraph, cluster: ClusterSpec, cand: Candidate, c: CostConstants) -> list[str]:
    cfg, pred = cand.config, cand.prediction
    lines = [
        f"Model {graph.name}: {format_count(graph.param_count)} parameters in {graph.num_layers} layers "
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
    if cfg.ep > 1:  # cost/experts.py: dispatch + combine, forward and backward, on the busiest device
        experts = sorted({r.num_experts for layer in graph.layers for r in layer.experts})
        lines.append(f"Expert parallelism ep={cfg.ep}: each rank holds 1/{cfg.ep} of the {'/'.join(map(str, experts))} "
                     f"experts of every MoE layer; the dispatch and combine all-to-alls take "
                     f"{pred.time_breakdown_s.get('ep_all_to_all', 0.0):.3f} s per step.")
    if cfg.cp > 1:  # cost/context_parallel.py: the K/V all-gathers on the busiest device
        busiest = [i for j, (a, b) in enumerate(cand.boundaries) for i in range(a, b)
                   if chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)[j] == pred.bottleneck_device]
        lines.append(cp_step_note(graph, cluster, cfg, busiest, c, graph.dtype))
    lines.extend(sharding_notes(cfg, cluster))  # HSDP, reshard, FP8, recompute every k (cost/sharding.py, fp8.py)
    lines.extend(attention_notes(graph, cluster, c))
    lines.append(f"Bottleneck device (pipeline position): {pred.bottleneck_device} "
                 f"({pred.binding[pred.bottleneck_device]}).")
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


def baseline_notes(baselines: list[BaselineRecord], step_time_s: float) -> list[str]:
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



def amount(nbytes: float) -> str:
    """A shortfall that never reads "0.0 GiB": GiB, else MiB, else bytes ("just over")."""
    if nbytes >= 0.05 * GiB:
        return f"{nbytes / GiB:.1f} GiB"
    if nbytes >= 0.05 * 2**20:
        return f"{nbytes / 2**20:.1f} MiB"
    return f"{max(nbytes, 1):.0f} bytes (just over)"


def _device_size(need_bytes: float, have_bytes: float) -> str:
    """A device size that holds ``need_bytes``, rounded up (0.1 GiB) so it never reads as the size in hand."""
    gib = math.ceil(need_bytes / GiB * 10) / 10
    if gib <= have_bytes / GiB:  # need is above what is in hand by less than the rounding
        gib = have_bytes / GiB + 0.1
    return f"{gib:.1f} GiB" if gib < 100 else f"{math.ceil(gib):.0f} GiB"


def _more_devices(graph: CostGraph, cluster: ClusterSpec, global_batch: int, c: CostConstants,
                  space: SearchSpace | None) -> str:
    """How many nodes would fit, as found by :func:`planner.hints.nodes_that_fit`, or why none would."""
    from planner.hints import nodes_that_fit, one_layer_floor

    limit = usable_memory_bytes(cluster, c)
    if limit <= 0:
        have = cluster.device.memory_bytes
        return (f"No number of these devices fits: device.memory_bytes = {have} ({have / GiB:.3g} GiB) leaves "
                f"nothing usable ({c.allocator_usable_fraction:.0%} of it, minus {c.reserved_bytes / GiB:.1f} GiB "
                f"reserved); memory_bytes is in bytes (80 GiB = 85899345920).")
    if not cluster.is_homogeneous:
        return "Or add nodes to the cluster file's groups."
    hint = nodes_that_fit(graph, cluster, global_batch, c, space)
    if hint is not None and hint.fits_at is not None:
        return f"With these devices, use {hint.phrase(cluster.nodes)}."
    layer, how = one_layer_floor(graph, cluster, c, space)
    searched = "" if hint is None else f"no count up to {hint.fails_at} nodes fits (searched)"
    if layer > limit:
        device = _device_size((layer + c.reserved_bytes) / c.allocator_usable_fraction, cluster.device.memory_bytes)
        lead = "No number of these devices fits: o" if hint is not None and hint.complete else "O"
        return (f"{lead}ne layer needs {layer / GiB:.1f} GiB ({how}), more than one device's {limit / GiB:.1f} GiB "
                f"usable{'; ' + searched if searched and not lead.startswith('No') else ''}: use devices with >= "
                f"{device}, or more tensor parallelism.")
    if hint is not None and hint.complete:
        return f"No count of these nodes fits: {searched}."
    return f"The search for a node count that fits found none{' up to ' + str(hint.fails_at) + ' nodes' if hint else ''} " \
           "within its time budget."


def _impossible_knob(space: SearchSpace | None, layers: int, devices: int) -> str | None:
    """A degree the user fixed that no configuration can have on ``devices``: one that does not divide
    them, a pipeline deeper than the model, or fixed degrees whose product is not the device count."""
    if space is None:
        return None
    fixed = {name: getattr(space, name) for name in ("dp", "cp", "tp", "pp") if getattr(space, name)}
    for name, values in fixed.items():
        if all(v > devices for v in values):
            return (f"--{name} {', '.join(map(str, values))} is more than the {devices} devices; lower it or add "
                    f"devices (--devices-per-node / --nodes)")
        if all(devices % v for v in values):
            return (f"--{name} {', '.join(map(str, values))} does not divide the {devices} devices; "
                    f"choose a divisor of {devices} or change --devices-per-node / --nodes")
    shards = [s for s in space.dp_shard or () if s is not None]
    if shards and len(shards) == len(space.dp_shard or ()) and all(devices % s for s in shards):
        return (f"--dp-shard {', '.join(map(str, shards))} does not divide the {devices} devices (a shard group "
                f"divides dp, which divides them); choose a divisor of {devices}, or drop --dp-shard")
    if "pp" in fixed and all(v > layers for v in fixed["pp"]):
        return f"--pp {', '.join(map(str, fixed['pp']))} is more stages than the model's {layers} layers; lower --pp"
    if len(fixed) == 4 and all(len(v) == 1 for v in fixed.values()):
        product = math.prod(v[0] for v in fixed.values())
        if product != devices:
            return (f"dp x cp x tp x pp = {product}, not the {devices} devices; free one of --dp / --cp / --tp / "
                    f"--pp or change --devices-per-node / --nodes")
    return None


def _no_valid_configuration(global_batch: int, space: SearchSpace | None, layers: int, devices: int) -> str:
    """Why the search priced nothing although the model's state fits: the batch and the fixed knobs."""
    msg = (f"the model's state fits, but no (dp, tp, pp, micro-batch, schedule) the search allows is valid "
           f"for global batch {global_batch}")
    pps = [p for p in (space.pp if space and space.pp else ()) if p > 1]
    names = space.schedules if space and space.schedules else ()
    if (knob := _impossible_knob(space, layers, devices)) is not None:
        msg += f" on {plural(devices, 'device')}: {knob}"
    elif pps and "1f1b" in names and len(names) == 1:
        need = min(pps)
        msg += (f": with pp={need}, '1f1b' needs at least {need} micro-batches per step (torch's Schedule1F1B, "
                f"which the runtime runs, refuses fewer) and global batch {global_batch} gives at most "
                f"{global_batch}; raise --global-batch to {need} or more, lower --pp, or allow --schedules gpipe")
    else:
        msg += (f" on {plural(devices, 'device')} (dp x tp x pp must use them all: dp divides the global batch, "
                f"tp the split dimensions, pp is at most the model's {plural(layers, 'layer')}); raise "
                "--global-batch, use fewer devices (--devices-per-node, --nodes), or free --pp / --dp / --tp / "
                f"--schedules{' / --dp-shard (a shard group divides dp)' if space and space.dp_shard else ''}")
    return msg


def infeasible_error(graph: CostGraph, cluster: ClusterSpec, global_batch: int, result: SearchResult,
                     c: CostConstants, space: SearchSpace | None = None) -> InfeasibleError:
    """Nothing fits: what overflows where, the device size that would hold it, and the node count that
    would (searched, :mod:`planner.hints`; ``space`` is the search's, so the count respects its knobs)."""
    limit = usable_memory_bytes(cluster, c)
    head = f"no configuration of {graph.name} fits on {cluster.summary()} with global batch {global_batch}"
    have = cluster.device.memory_bytes
    if limit <= 0:
        return InfeasibleError(f"{head}. {_more_devices(graph, cluster, global_batch, c, space)}",
                               details={"usable_bytes": limit})
    if result.closest_misses:
        best = result.closest_misses[0]
        pred: StepPrediction = best.prediction
        worst = max(range(len(pred.memory_per_device)), key=lambda d: pred.memory_per_device[d].total)
        parts = pred.memory_per_device[worst]
        over = parts.total - limit
        biggest = max(("weights", parts.weights), ("gradients", parts.gradients), ("optimizer", parts.optimizer),
                      ("activations", parts.activations), key=lambda kv: kv[1])
        need = (parts.total + c.reserved_bytes) / c.allocator_usable_fraction
        msg = (f"{head}. Closest: {best.config.label()} needs {parts.total / GiB:.1f} GiB on pipeline stage {worst} "
               f"({amount(over)} over the {limit / GiB:.1f} GiB usable); the largest part is "
               f"{biggest[0]} ({biggest[1] / GiB:.1f} GiB). On {cluster.nodes} node{'s' if cluster.nodes != 1 else ''} it "
               f"would fit on devices with {_device_size(need, have)}. "
               f"{_more_devices(graph, cluster, global_batch, c, space)}")
        return InfeasibleError(msg, details={"missing_bytes": over, "stage": worst, "parts": parts.as_dict(),
                                             "config": best.config.label()})
    n = cluster.num_devices
    if result.memory_bound_misses:
        parts, cfg = result.memory_bound_misses[0]
        need = parts["total"]
        per_device = (need + c.reserved_bytes) / c.allocator_usable_fraction
        named = {k: v for k, v in parts.items() if k != "total"}
        biggest = max(named, key=named.get)
        return InfeasibleError(
            f"{head}. Closest: {cfg.label()} needs at least {need / GiB:.1f} GiB on its busiest device "
            f"({amount(need - limit)} over the {limit / GiB:.1f} GiB usable); the largest part is "
            f"{biggest} ({named[biggest] / GiB:.1f} GiB). On {cluster.nodes} node{'s' if cluster.nodes != 1 else ''} "
            f"it would need devices with at least {_device_size(per_device, have)}. "
            f"{_more_devices(graph, cluster, global_batch, c, space)}",
            details={"missing_bytes": need - limit, "config": cfg.label(), "parts": named})
    total_state = model_state_bytes(graph, c)
    if total_state / n <= limit:  # memory is not why: the knobs and the batch leave no valid configuration
        return InfeasibleError(f"{head}: {_no_valid_configuration(global_batch, space, graph.num_layers, n)}",
                               details={"state_bytes": total_state, "reason": "empty search space"})
    min_devices = math.ceil(total_state / limit) if limit > 0 else None
    floor = (f"so at least {min_devices} devices before activations" if min_devices
             else "and these devices have no usable memory")
    return InfeasibleError(
        f"{head}: even fully sharded, weights + gradients + optimizer state need {total_state / GiB:.0f} GiB "
        f"({total_state / n / GiB:.1f} GiB per device on {n} devices; {limit / GiB:.1f} GiB usable), {floor}. "
        f"Also check that the global batch is divisible by a feasible data-parallel degree. "
        f"{_more_devices(graph, cluster, global_batch, c, space)}",
        details={"min_devices": min_devices, "state_bytes": total_state})


def attention_notes(graph: CostGraph, cluster: ClusterSpec, c: CostConstants) -> list[str]:
    """Which rate a fused-attention model's attention kernels were priced at, per device kind, when the
    trainer names a kernel some device states a figure for (``CostConstants.attention_kernel``)."""
    # From the traced ops, not ``graph.attention``: a graph read back from a plan file does not carry it.
    if not c.attention_kernel or attention_kind(graph) != "fused":
        return []
    named = {g.device.name: eff for g in cluster.groups if (eff := g.device.attention_efficiency(c.attention_kernel))}
    if not named:
        return []
    rates = ", ".join(f"{eff:.0%} of peak on {name}" for name, eff in sorted(named.items()))
    kernel = c.attention_kernel
    what = " (Transformer Engine's cuDNN fused attention, its choice on Hopper and Blackwell)" if kernel == "cudnn" else ""
    return [f"Attention: priced as the trainer's '{kernel}' kernel{what} at {rates} (device.attention_kernels."
            f"{kernel}) instead of the FlashAttention-2 class's fused_attention_efficiency; --trainer eager, "
            "compiled or torch (or attention_kernel \"\" in --constants) prices FlashAttention-2."]


def sharding_notes(cfg: ParallelConfig, cluster: ClusterSpec) -> list[str]:
    """A sentence for each of HSDP, keeping the gathered weights, FP8 and recomputing one layer in k, when chosen."""
    notes = []
    if cfg.zero_stage == 3 and cfg.dp_shard is not None and cfg.dp_shard < cfg.dp:
        ranks = cfg.dp_shard * cfg.cp * cfg.tp
        dpn = cluster.min_devices_per_node
        where = "inside one node" if ranks <= dpn else f"over {plural(-(-ranks // dpn), 'node')}"
        notes.append(f"HSDP: ZeRO-3 shards over groups of {cfg.dp_shard} data-parallel ranks ({where}) and keeps "
                     f"{cfg.dp // cfg.dp_shard} replicas: each micro-batch's gathers and reduce-scatters stay in "
                     f"the group and the gradient shard is all-reduced across the replicas; each rank holds "
                     f"1/{cfg.dp_shard} of the model state instead of 1/{cfg.dp}.")
    if keeps_unsharded_grads(cfg):
        gathers = "one all-gather per step" if not cfg.reshard_after_forward else \
            "one all-gather per micro-batch (the backward's, after reshard after forward)"
        notes.append("ZeRO-3 under a pipeline runs as torch's pipelining drives FSDP2: the gathered weights and the "
                     f"unsharded gradients stay from one micro-batch to the next ({gathers}, one reduce-scatter "
                     "after the last backward), for the memory of the whole gathered stage and its full gradients.")
    elif cfg.zero_stage == 3 and not cfg.reshard_after_forward:
        notes.append("ZeRO-3 keeps each device's gathered weights from forward to backward (reshard_after_forward "
                     "false): one all-gather per micro-batch instead of two, for the memory of the whole gathered "
                     "stage.")
    if cfg.fp8:
        peak = min(g.device.peak("fp8") for g in cluster.groups)
        notes.append(f"FP8: the linear layers (all but the output head) run float8 GEMMs (torchao) at the FP8 peak "
                     f"of {peak / 1e12:.0f} TFLOP/s with their casts priced; weights, optimizer state and saved "
                     "activations stay as in bf16 training. FP8 changes the training numerics (scaled 8-bit "
                     "products): check convergence against bf16, or plan with --no-fp8.")
    if cfg.recompute == "full" and cfg.recompute_every > 1:
        k = cfg.recompute_every
        notes.append(f"Full recomputation of one layer in every {k} (layers {k - 1}, {2 * k - 1}, ...: torchtitan's "
                     f"selective_ac_option = {k}); the other layers keep their activations.")
    return notes
