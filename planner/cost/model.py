"""Predict one training step of a configuration: time, memory per device, MFU, and why.

:func:`evaluate` prices a full configuration with given stage boundaries from its layer tables
(:mod:`planner.cost.layer_table`: one per node group; a homogeneous cluster is the one-group case)
and returns a :class:`StepPrediction` whose time breakdown adds up to the step time. Tables, the
intra-op ILP's tp seconds and their caches live one level up, in :class:`planner.pricing.Pricer`;
this module is pure arithmetic on them.

Step time (docs/cost-model.md has every formula)::

    step = pipeline(schedule; per-chunk fwd, bwd-input, bwd-weight; p2p)      busiest device's
                                                                              work + bubble + p2p
         + max_devices(exposed DP gradient sync + ZeRO-3 gathers + tied-embedding sync + optimizer)

Per chunk, per micro-batch: forward = compute + forward tensor-parallel collectives; backward-input
= compute + backward collectives + recomputation; backward-weight = compute. Every device runs
``m`` micro-batches of its chunks, so ``step ≥ m · Σ_layers LayerTable.total_s / pp`` (the busiest
device works at least the average) — the lower bound the search prunes with.

Memory: :mod:`planner.cost.memory`. Which device type and memory limit each pipeline position
has, and which chunks each device runs: :mod:`planner.cost.positions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from planner import schedules
from planner.cluster import ClusterSpec
from planner.cost.comm import (
    Group,
    cut_link,
    overlapped_comm_s,
    step_collective_notes,
)
from planner.cost.constants import CostConstants
from planner.cost.experts import (
    dp_grad_all_reduce_s,
    expert_all_to_all_s,
    expert_shard_extra,
    zero3_step_s,
    zero_step_s,
)
from planner.cost.grad_overlap import backward_release, exposed_reduce_s
from planner.cost.layer_table import (
    NO_KNOBS,
    TP_PRICING,
    LayerTable,
    Segment,
    TableKnobs,
    TpSeconds,
    group_layer_tables,
    layer_table,
    loss_traffic_s,
    megatron_tp_s,
    tp_allreduces,
    tp_collectives,
)
from planner.cost.memory import (
    MemoryParts,
    device_params,
    stage_memory,
    stage_memory_matrix,
    stage_memory_vec,
    stage_params,
    usable_memory_bytes,
)
from planner.cost.pipeline_links import pipeline_p2p_s, tied_holder_devices, tied_sync_s
from planner.cost.positions import Position, chunk_indices, chunks_of_device, positions
from planner.cost.sharding import keeps_unsharded_grads, optimizer_shard, shard_groups, shard_size
from planner.plan import ParallelConfig
from planner.schedules.closed_form import in_flight_per_device, step_time
from planner.trace.graph import CostGraph

__all__ = [
    "NO_KNOBS", "TP_PRICING", "LayerTable", "MemoryParts", "Segment", "StepPrediction", "TableKnobs", "TpSeconds",
    "evaluate",
    "group_layer_tables", "layer_table", "loss_traffic_s", "megatron_tp_s", "positions", "stage_memory", "stage_memory_matrix",
    "stage_memory_vec", "stage_params", "tp_allreduces", "tp_collectives", "usable_memory_bytes",
]


@dataclass
class StepPrediction:
    """One priced step. The per-device lists have one entry per pipeline *device* (position), not per
    stage (model chunk): with ``v`` virtual stages a device runs ``v`` chunks. The ``*_stage*`` names
    of before are read-only aliases."""

    step_time_s: float
    mfu: float
    fits: bool
    memory_per_device: list[MemoryParts]
    time_breakdown_s: dict[str, float]
    device_times_s: list[float]
    bottleneck_device: int
    binding: list[str]
    memory_limit_bytes: float
    schedule_result: object = None
    notes: list[str] = field(default_factory=list)
    # Per pipeline device (mixed clusters: each device type's own limit; empty when not set).
    memory_limit_per_device_bytes: list[float] = field(default_factory=list)
    device_names: list[str] = field(default_factory=list)
    # Per chunk, in model order: (forward, backward-input, backward-weight) seconds of one micro-batch,
    # as the schedule was priced (communication and pipeline-step overheads included).
    chunk_phase_times_s: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def peak_memory_bytes(self) -> float:
        return max(m.total for m in self.memory_per_device)

    # The names before "stage" meant a model chunk only (read-only aliases of the per-device fields).
    memory_per_stage = property(lambda self: self.memory_per_device)
    stage_times_s = property(lambda self: self.device_times_s)
    bottleneck_stage = property(lambda self: self.bottleneck_device)
    memory_limit_per_stage_bytes = property(lambda self: self.memory_limit_per_device_bytes)
    stage_device_names = property(lambda self: self.device_names)


def evaluate(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, boundaries: list[tuple[int, int]],
             c: CostConstants, *, table: LayerTable | None = None,
             group_tables: Sequence[LayerTable] | None = None) -> StepPrediction:
    """Price ``cfg`` with ``boundaries`` (pp × virtual_stages contiguous chunks, in model order).

    ``table`` is the configuration's layer table on the whole cluster (memory, parameters, the bytes
    at each cut); ``group_tables`` holds one per node group, each on its own device type (the speed
    of the positions it runs); a homogeneous cluster's one group is ``table`` itself. Tables not
    given are built here with the Megatron tp count (:class:`planner.pricing.Pricer` passes the
    intra-op ILP's).
    """
    p, v, m = cfg.pp, cfg.virtual_stages, cfg.num_micro_batches
    assert len(boundaries) == p * v, (len(boundaries), p, v)
    devices = schedules.chunk_devices(cfg.schedule, p, v)  # chunk -> device, as the schedule places it
    if table is None:
        table = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                            sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c,
                            knobs=TableKnobs.of(cfg))
    if group_tables is None:
        group_tables = [table] if len(cluster.groups) == 1 else group_layer_tables(  # one group: table itself
            graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp, sequence_parallel=cfg.sequence_parallel,
            recompute=cfg.recompute, c=c, dtype=table.dtype, knobs=TableKnobs.of(cfg))
    pos = positions(cluster, cfg, c, group_tables)
    fwd, bin_, bw, tp_wait = _chunk_phase_times(pos, boundaries, devices, cfg, c, cluster)
    p2p = pipeline_p2p_s(table, boundaries, devices, cfg, cluster, c)
    result = schedules.estimate(cfg.schedule, p=p, m=m, v=v, fwd_s=fwd, bwd_input_s=bin_, bwd_weight_s=bw,
                                p2p_s=p2p)
    pipeline_s = result.step_time_s
    if p2p > 0:
        no_p2p_s = step_time(cfg.schedule, p=p, m=m, v=v, fwd_s=fwd, bwd_input_s=bin_, bwd_weight_s=bw, p2p_s=0.0)
    else:
        no_p2p_s = pipeline_s
    held = chunk_indices(devices, p)
    per_device = [sum(fwd[j] + bin_[j] + bw[j] for j in held[d]) for d in range(p)]
    if p > 1 and c.idle_reclaim_fraction > 0:  # processes time-sharing cores run faster in the others' bubble
        reclaimed = c.idle_reclaim_fraction * max(0.0, no_p2p_s - m * max(per_device))
        pipeline_s, no_p2p_s = pipeline_s - reclaimed, no_p2p_s - reclaimed
    tails = _device_tails(table, pos, boundaries, held, cfg, cluster, c, per_device, bin_, bw)
    tail = [sum(parts[d] for parts in tails) for d in range(p)]
    worst_tail = int(np.argmax(tail))
    step = pipeline_s + tail[worst_tail]
    busiest = int(np.argmax(per_device))
    breakdown = _breakdown(pos[busiest].table, [boundaries[j] for j in held[busiest]], cfg, c,
                           no_p2p_s=no_p2p_s, pipeline_s=pipeline_s, tails=tails, worst=worst_tail,
                           tp_wait_s=cfg.num_micro_batches * sum(w for j, w in enumerate(tp_wait) if devices[j] == busiest))
    tp_comm = breakdown["tp_comm"]
    notes = _notes(graph, cluster, cfg, c, table, boundaries, devices, tp_comm, pos)
    limits = [x.limit for x in pos]
    memory = _device_memory(table, boundaries, devices, cfg, c, held)
    binding = _binding(memory, limits, busiest, pipeline_s, step, tp_comm + breakdown.get("pp_tp_wait", 0.0), tails)
    flops = graph.train_flops * cfg.global_batch
    peak = sum(g.device.peak(table.dtype) * g.num_devices for g in cluster.groups)  # every device at its own peak
    mfu = flops / (step * peak) if step > 0 else 0.0
    return StepPrediction(step_time_s=step, mfu=mfu, fits=all(mp.total <= lim for mp, lim in zip(memory, limits)),
                          memory_per_device=memory, time_breakdown_s=breakdown, device_times_s=per_device,
                          bottleneck_device=busiest, binding=binding, memory_limit_bytes=min(limits),
                          schedule_result=result, notes=notes, memory_limit_per_device_bytes=limits,
                          device_names=[x.device_name for x in pos],
                          chunk_phase_times_s=list(zip(fwd, bin_, bw)))


def pipelined_tp_floor_s(cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants) -> float:
    """The least device time one tensor-parallel collective takes in ``cfg``'s pipeline
    (``CostConstants.pipelined_tp_collective_s`` + ``pipelined_tp_hop_s`` per ring hop), where the
    trainer pays it: tp > 1 and some pipeline cut crosses nodes. 0 elsewhere."""
    if cfg.pp < 2 or cfg.tp < 2 or not (c.pipelined_tp_collective_s or c.pipelined_tp_hop_s):
        return 0.0
    per = cfg.world_size // cfg.pp  # ranks per position: a cut pairs each rank with the one ``per`` later
    if all(cut_link(cluster, (k - 1) * per, (k + 1) * per - 1)[1] for k in range(1, cfg.pp)):
        return 0.0
    return c.pipelined_tp_collective_s + c.pipelined_tp_hop_s * (cfg.tp - 1)


def _chunk_phase_times(pos: list[Position], boundaries: list[tuple[int, int]], devices: tuple[int, ...],
                       cfg: ParallelConfig, c: CostConstants,
                       cluster: ClusterSpec) -> tuple[list[float], list[float], list[float], list[float]]:
    """Forward, backward-input and backward-weight seconds of one micro-batch of each chunk, on its
    position's device, with the tp collectives and the pipeline-step overhead; and the seconds of each
    that the floor under tensor-parallel collectives adds (:func:`pipelined_tp_floor_s`: half of a
    chunk's collectives run in its forward, half in its backward)."""
    fwd, bin_, bw, wait = [], [], [], []
    tp_floor_s = pipelined_tp_floor_s(cluster, cfg, c)
    # A pipeline runs each chunk's micro-batch as its own step: wait on the received activation, then
    # launch the chunk's kernels, so the host's lead over the device is lost at every step.
    step_overhead = c.pipeline_step_overhead_s if cfg.pp > 1 else 0.0
    for j, (a, b) in enumerate(boundaries):
        s = pos[devices[j]].table.segment(a, b)
        comm_f = s.tp_comm_fwd_s
        comm_b = s.tp_comm_s - comm_f
        f, bi = s.fwd_s + comm_f, s.bwd_input_s + comm_b + s.recompute_s
        floor = s.tp_calls * tp_floor_s / 2
        extra_f, extra_b = max(0.0, floor - f), max(0.0, floor - bi - s.bwd_weight_s)
        fwd.append(max(f + extra_f, 1e-12) + step_overhead)
        bin_.append(bi + extra_b + step_overhead)
        bw.append(s.bwd_weight_s)
        wait.append(extra_f + extra_b)
    return fwd, bin_, bw, wait


def _device_tails(table: LayerTable, pos: list[Position], boundaries: list[tuple[int, int]],
                  held: list[list[int]], cfg: ParallelConfig, cluster: ClusterSpec, c: CostConstants,
                  per_device: list[float], bin_: list[float], bw: list[float]
                  ) -> tuple[list[float], list[float], list[float], list[float]]:
    """Per device, after the pipeline: exposed data-parallel gradient sync (and ZeRO gathers), ZeRO-3
    gathers per micro-batch, tied-embedding sync, the optimizer step and the gradient accumulation, in that order."""
    p, m = cfg.pp, cfg.num_micro_batches
    w_b, g_b, _ = c.state_bytes(table.dtype)
    dp_exposed, fsdp_exposed, tied_sync, optim_s, accum_s = [], [], [], [], []
    tied_holders = tied_holder_devices(table.trained, boundaries, cfg) if p > 1 else []
    for d in range(p):
        # this position's own ZeRO shard group and HSDP replicas (cost/sharding.py), links and memory bandwidth
        groups = shard_groups(cluster, cfg, d)
        dp_group: Group = groups.shard
        bw_mem = pos[d].cluster.device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
        chunks = [boundaries[j] for j in held[d]]
        params = device_params(table, chunks) / cfg.tp
        # frozen parameters (requires_grad=False) have no gradient to reduce and no update to gather back
        trained = params if table.trained is table else device_params(table.trained, chunks) / cfg.tp
        grads, weights = g_b * trained, w_b * trained
        if cfg.zero_stage == 0:  # expert gradients over their dp/ep replicas (cost/experts.py)
            reduce = dp_grad_all_reduce_s(table, chunks, grads, dp_group, dp=cfg.dp, ep=cfg.ep, tp=cfg.tp, cp=cfg.cp,
                                          cluster=cluster, c=c)
            gather = 0.0
        elif cfg.zero_stage < 3:  # the experts' part over their own shard group under ep (cost/experts.py)
            reduce, gather = zero_step_s(table, chunks, grads, weights, groups, cfg, cluster, c)
        else:  # gradients are reduce-scattered per micro-batch, parameters gathered on use
            reduce, gather = 0.0, 0.0
        if gather and c.overlap_param_gather:  # buckets gather under the next step's first forward
            first_fwd = sum(pos[d].table.segment(a, b).fwd_s for a, b in chunks)
            gather = overlapped_comm_s(gather, first_fwd, c)
        if cfg.overlap_grad_reduce:  # buckets reduce as the last micro-batch's backward produces them
            backward = [bin_[j] + bw[j] for j in held[d]]  # as chunks
            seconds, released = backward_release(pos[d].table.trained, chunks, backward)
            reduce = exposed_reduce_s(reduce, seconds, released, c.grad_bucket_bytes / max(grads, 1.0), c)
        fsdp_host = 0.0  # the sharding framework's host work: per wrapped layer and micro-batch
        if cfg.zero_stage >= 1 and cfg.dp > 1 and c.fsdp_layer_overhead_s > 0:
            units = sum(int(np.count_nonzero(pos[d].table.params[a:b])) for a, b in chunks)
            fsdp_host = m * units * c.fsdp_layer_overhead_s
        dp_exposed.append(reduce + gather + (fsdp_host if cfg.zero_stage < 3 else 0.0))
        if cfg.zero_stage >= 3 and cfg.dp > 1:
            # gathers, reduce-scatter (HSDP: + all-reduce); the experts' over their own group (cost/experts.py)
            gathered = c.gathered_weight_bytes(table.dtype) * params  # FSDP gathers in its param dtype
            fsdp_exposed.append(zero3_step_s(table, chunks, gathered, grads, groups, cfg, cluster, c, per_device[d])
                                + fsdp_host)
        else:
            fsdp_exposed.append(0.0)
        tied_sync.append(tied_sync_s(table.trained, boundaries, d, cfg, cluster, c, g_b, tied_holders))
        shard = optimizer_shard(cfg)
        optim_s.append(c.optimizer_step_bytes_per_param * trained / shard / bw_mem
                       + c.optimizer_step_bytes_per_param * expert_shard_extra(table, chunks, cfg, shard) / bw_mem
                       + optimizer_loop_s(table, chunks, c))
        # every micro-batch after the first adds its gradients into the sum (ZeRO-2/3: into the shard)
        acc_shard = shard_size(cfg) if cfg.zero_stage >= 2 and not keeps_unsharded_grads(cfg) else 1
        accum_s.append((m - 1) * c.grad_accumulation_bytes_per_param * trained / acc_shard / bw_mem
                       + (m - 1) * c.grad_accumulation_bytes_per_param
                       * expert_shard_extra(table, chunks, cfg, acc_shard) / bw_mem)
    return dp_exposed, fsdp_exposed, tied_sync, optim_s, accum_s


def optimizer_loop_s(table: LayerTable, chunks: list[tuple[int, int]], c: CostConstants) -> float:
    """The optimizer's per-tensor host work on one device: ``optimizer_tensor_overhead_s`` for each parameter
    tensor that trains in its chunks (a shard of a tensor is still one tensor to loop over)."""
    if not c.optimizer_tensor_overhead_s or table.trained_tensors is None:
        return 0.0
    return c.optimizer_tensor_overhead_s * float(sum(table.trained_tensors[a:b].sum() for a, b in chunks))


def _breakdown(tb: LayerTable, chunks_b: list[tuple[int, int]], cfg: ParallelConfig, c: CostConstants, *,
               no_p2p_s: float, pipeline_s: float, tails: tuple[list[float], ...], worst: int,
               tp_wait_s: float = 0.0) -> dict[str, float]:
    """The step along the busiest device (chunks ``chunks_b`` of table ``tb``): its own work, then what
    the pipeline adds, then the tail of the device with the longest one (``worst``). ``tp_wait_s``: the
    busiest device's seconds under the pipelined tensor-parallel floor (:func:`pipelined_tp_floor_s`)."""
    m = cfg.num_micro_batches
    segs_b = [tb.segment(a, b) for a, b in chunks_b]

    def seg(field_name: str) -> float:
        return m * sum(getattr(s, field_name) for s in segs_b)

    step_overhead = c.pipeline_step_overhead_s if cfg.pp > 1 else 0.0
    compute = seg("fwd_s") + seg("bwd_input_s") + seg("bwd_weight_s")
    recomp, tp_comm = seg("recompute_s"), seg("tp_comm_s")
    all_to_all = expert_all_to_all_s(tb, chunks_b, m)  # a part of tp_comm_s, reported on its own
    steps = 2 * m * len(chunks_b) * step_overhead  # the busiest device's pipeline-step overheads
    bubble = no_p2p_s - compute - recomp - tp_comm - steps - tp_wait_s
    if abs(bubble) < 1e-9 * no_p2p_s:  # rounding: the busiest device's work is a lower bound of the pipeline
        bubble = 0.0
    dp_exposed, fsdp_exposed, tied_sync, optim_s, accum_s = tails
    dp_key = "dp_comm_exposed_after_overlap" if cfg.overlap_grad_reduce else "dp_comm_exposed"
    return {
        "compute": compute,
        "recompute": recomp,
        "tp_comm": tp_comm - all_to_all if all_to_all else tp_comm,
        **({"pp_tp_wait": tp_wait_s} if tp_wait_s else {}),
        **({"ep_all_to_all": all_to_all} if all_to_all else {}),
        "pp_bubble": bubble,
        "pp_step_overhead": steps,
        "pp_p2p_exposed": pipeline_s - no_p2p_s,
        dp_key: dp_exposed[worst],
        "zero3_gather_exposed": fsdp_exposed[worst],
        "embedding_sync": tied_sync[worst],
        "optimizer": optim_s[worst],
        **({"grad_accumulation": accum_s[worst]} if c.grad_accumulation_bytes_per_param else {}),
    }


def _notes(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants, table: LayerTable,
           boundaries: list[tuple[int, int]], devices: tuple[int, ...], tp_comm: float,
           pos: list[Position]) -> list[str]:
    """What the prediction's reader should know: tp across nodes, overlap, measured curves, device types."""
    notes = []
    dpn = cluster.min_devices_per_node
    if cfg.tp > dpn:  # the search and check_config allow it on one device type only
        notes.append(f"tensor parallelism spans {cfg.tp // dpn} nodes: its collectives "
                     f"({tp_comm:.3g} s of this step) cross the network in every layer")
    if cfg.overlap_grad_reduce:
        dp_key = "dp_comm_exposed_after_overlap"
        notes.append("data-parallel gradient reduction overlaps the last micro-batch's backward; "
                     f"{dp_key} is what remains exposed")
    if any(grp.collectives is not None for grp in cluster.groups):  # what the measured curves priced (cluster.md)
        g_b = c.state_bytes(table.dtype)[1]
        tp_bytes = [x * cfg.micro_batch_size for lay in graph.layers for x in sum(tp_collectives(lay, table.dtype), [])]
        dp_bytes = [g_b * device_params(table.trained, chunks_of_device(boundaries, devices, d)) / cfg.tp
                    for d in range(cfg.pp)]
        p2p_bytes = [float(table.output_bytes[b - 1]) for _, b in boundaries[:-1]]
        notes.extend(step_collective_notes(cluster, cfg, c, tp_bytes=tp_bytes, dp_bytes=dp_bytes, p2p_bytes=p2p_bytes))
    if len(cluster.groups) > 1:
        notes.append("mixed cluster: pipeline positions run on " + ", ".join(
            f"{d}:{x.device_name}" for d, x in enumerate(pos)) + " (each priced with its own speed and memory)")
    return notes


def _device_memory(table: LayerTable, boundaries: list[tuple[int, int]], devices: tuple[int, ...],
                   cfg: ParallelConfig, c: CostConstants, held: list[list[int]]) -> list[MemoryParts]:
    """Memory of each pipeline device (``held``: its chunks' indices, :func:`chunk_indices`): its chunks
    at the schedule's in-flight micro-batch count."""
    flights = in_flight_per_device(cfg.schedule, p=cfg.pp, m=cfg.num_micro_batches, v=cfg.virtual_stages)
    return [stage_memory(table, [boundaries[j] for j in held[d]], in_flight=flights[d], cfg=cfg, c=c,
                         is_last=(d == devices[-1])) for d in range(cfg.pp)]


def _binding(memory: list[MemoryParts], limits: list[float], busiest: int, pipeline_s: float, step: float,
             tp_comm: float, tails: tuple[list[float], ...]) -> list[str]:
    """What limits each device: memory, or (the busiest) compute or communication, or nothing."""
    dp_exposed, fsdp_exposed = tails[0], tails[1]
    binding = []
    for d in range(len(memory)):
        if memory[d].total > limits[d]:
            binding.append("memory (over the limit)")
        elif memory[d].total > 0.9 * limits[d]:
            binding.append("memory")
        elif d == busiest and pipeline_s > 0:
            comm_share = (tp_comm + dp_exposed[d] + fsdp_exposed[d]) / step if step > 0 else 0.0
            binding.append("communication" if comm_share > 0.3 else "compute")
        else:
            binding.append("none (waits on the bottleneck stage)")
    return binding
