"""Predict one training step of a configuration: time, memory per device, MFU, and why.

Two layers of API:

* :class:`LayerTable` holds per-layer arrays (seconds per micro-batch, stored activation bytes,
  parameters) for one ``(micro-batch, tp, sequence-parallel, recompute)`` choice, so the stage
  solvers can price any contiguous run of layers with prefix sums.
* :func:`evaluate` prices a full configuration with given stage boundaries and returns a
  :class:`StepPrediction` whose time breakdown adds up to the step time.

Step time (docs/cost-model.md has every formula)::

    step = pipeline(schedule; per-chunk fwd, bwd-input, bwd-weight; p2p)      busiest device's
                                                                              work + bubble + p2p
         + max_devices(exposed DP gradient sync + ZeRO-3 gathers + tied-embedding sync + optimizer)

Per chunk, per micro-batch: forward = compute + forward tensor-parallel collectives; backward-input
= compute + backward collectives + recomputation; backward-weight = compute. Every device runs
``m`` micro-batches of its chunks, so ``step ≥ m · Σ_layers LayerTable.total_s / pp`` (the busiest
device works at least the average) — the lower bound the search prunes with.

Memory: :mod:`planner.cost.memory`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from planner.cluster import ClusterSpec
from planner.cost.comm import (
    Group,
    all_gather_s,
    all_reduce_s,
    group_of_ranks,
    p2p_s,
    reduce_scatter_s,
    step_collective_notes,
    strided_group,
)
from planner.cost.compute import ATTENTION_KINDS, LINEAR_KINDS, activation_shard, layer_times
from planner.cost.constants import DTYPE_BYTES, CostConstants
from planner.cost.memory import (
    MemoryParts,
    _range_max,
    _stage_params,
    stage_memory,
    stage_memory_matrix,
    stage_memory_vec,
    stage_params,
    usable_memory_bytes,
)
from planner.plan import ParallelConfig
from planner.trace.graph import CostGraph, Layer

__all__ = [
    "LayerTable", "MemoryParts", "StepPrediction", "evaluate", "layer_table", "stage_memory",
    "stage_memory_matrix", "stage_memory_vec", "stage_params", "tp_collectives", "usable_memory_bytes",
]


def tp_collectives(layer: Layer, dtype: str) -> tuple[list[float], list[float]]:
    """Bytes per sample of each forward and each backward all-reduce under Megatron tensor parallelism.

    Linears are column-parallel until a row-parallel one closes the group: one that contracts
    (``k > n``), or a square one after attention (the output projection). A row-parallel linear
    all-reduces its output in forward (``m·n``); a column-parallel group all-reduces its input's
    gradient in backward (``m·k``). A GPT block gives two of each; a vocabulary-parallel head only
    the backward one; a layer with parameters but no GEMM (a vocabulary-parallel embedding) one
    forward all-reduce of its output. With sequence parallelism each all-reduce becomes a
    reduce-scatter plus an all-gather of the same bytes and the same ring time.
    """
    elt = DTYPE_BYTES.get(dtype, 2)
    fwd: list[float] = []
    bwd: list[float] = []
    group_open = after_attention = False
    linears = 0
    for op in layer.op_costs:
        if op.kind in ATTENTION_KINDS:
            after_attention = True
            continue
        if op.kind not in LINEAR_KINDS or not op.m:
            continue
        linears += 1
        row = group_open and (op.k > op.n or (op.k == op.n and after_attention))
        if row:
            fwd.append(float(op.m * op.n * elt))
            group_open = False
        elif not group_open:
            bwd.append(float(op.m * op.k * elt))
            group_open = True
        after_attention = False
    if not linears and layer.param_count > 0 and layer.output_bytes > 0:
        fwd.append(float(layer.output_bytes))
    return fwd, bwd


def megatron_tp_s(layer: Layer, *, dtype: str, micro_batch: int, group: Group, sequence_parallel: bool,
                  c: CostConstants) -> tuple[float, float]:
    """Forward and backward seconds of :func:`tp_collectives` for one micro-batch on ``group``.

    Without sequence parallelism each is an all-reduce (ring or tree, whichever is faster); with it
    Megatron-SP runs a reduce-scatter and an all-gather of the same bytes (ring only), which is
    also how the intra-op ILP prices that recipe, so the two pricings agree on it.
    """
    def one(nbytes: float) -> float:
        if sequence_parallel:
            return reduce_scatter_s(nbytes, group, c) + all_gather_s(nbytes, group, c)
        return all_reduce_s(nbytes, group, c)

    fwd_c, bwd_c = tp_collectives(layer, dtype)
    return (sum(one(x * micro_batch) for x in fwd_c), sum(one(x * micro_batch) for x in bwd_c))


def tp_allreduces(layer: Layer) -> int:
    """All-reduces per forward + backward pass under tensor parallelism (see :func:`tp_collectives`)."""
    fwd, bwd = tp_collectives(layer, "bf16")
    return len(fwd) + len(bwd)


def loss_traffic_s(layer: Layer, *, micro_batch: int, tp: int, dtype: str, cluster: ClusterSpec,
                   c: CostConstants) -> float:
    """Seconds of the training loss (forward + backward) on the last layer's output: memory-bound,
    ``loss_traffic_passes`` passes over it in fp32, split across tp ranks (vocabulary-parallel)."""
    fp32_bytes = layer.output_bytes * micro_batch * 4.0 / DTYPE_BYTES.get(dtype, 2) / tp
    bw = cluster.device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
    return c.loss_traffic_passes * fp32_bytes / bw


class Segment(NamedTuple):
    """Sums and maxima over one contiguous run of layers ``[a, b)`` of a :class:`LayerTable`.

    Each field is exactly what ``float(arr[a:b].sum())`` (or ``.max()``) gives, so code that reads
    it instead of slicing prices every configuration to the same bit.
    """

    fwd_s: float
    bwd_input_s: float
    bwd_weight_s: float
    recompute_s: float
    tp_comm_s: float
    tp_comm_fwd_s: float
    stored_act_bytes: float
    work_act_max: float
    output_max: float
    param_max: float
    params: float  # stage_params: own plus tied ones owned outside the run, counted once


@dataclass
class LayerTable:
    """Per-layer, per-micro-batch figures for one (micro-batch, tp, sp, recompute) choice.

    The arrays are never modified after construction (every builder fills them once), which is
    what lets :meth:`segment` memoise per-segment sums: the search prices the same segments for
    many configurations that share a table.
    """

    fwd_s: np.ndarray
    bwd_input_s: np.ndarray
    bwd_weight_s: np.ndarray
    recompute_s: np.ndarray
    tp_comm_s: np.ndarray  # forward + backward
    stored_act_bytes: np.ndarray  # held per in-flight micro-batch
    work_act_bytes: np.ndarray  # extra working set while one layer is recomputed
    params: np.ndarray  # own parameters (not divided by tp)
    output_bytes: np.ndarray  # per micro-batch, per device
    tied: list[list[tuple[str, int, int]]]
    _matrices: dict[str, np.ndarray] | None = None
    tp_comm_fwd_s: np.ndarray | None = None  # the forward part of tp_comm_s (None: half of it)
    dtype: str = "bf16"
    # How tp_comm_s was priced: "ilp" (the intra-op ILP's optimum), "megatron" (the all-reduce
    # count of tp_collectives), "none" (left out: a lower bound for the search) or "" (tp = 1).
    tp_source: str = ""
    tp_note: str = ""  # one line for the plan: what priced it, or why the ILP could not
    # Memoised derived figures (see segment, total_s, total_summary_s); not part of the table's value.
    _segments: dict[tuple[int, int], Segment] = field(default_factory=dict, init=False, repr=False, compare=False)
    _totals: dict[str, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def total_s(self) -> np.ndarray:
        """Seconds per layer and micro-batch, all parts; computed once (read-only: it is shared)."""
        total = self._totals.get("total")
        if total is None:
            total = self.fwd_s + self.bwd_input_s + self.bwd_weight_s + self.recompute_s + self.tp_comm_s
            total.setflags(write=False)
            self._totals["total"] = total
        return total  # type: ignore[return-value]

    def total_summary_s(self) -> tuple[float, float]:
        """``(Σ total_s, max total_s)``: the search's work bound reads them for every configuration."""
        summary = self._totals.get("summary")
        if summary is None:
            total = self.total_s
            summary = (float(total.sum()), float(total.max()))
            self._totals["summary"] = summary
        return summary  # type: ignore[return-value]

    def total_prefix_s(self) -> np.ndarray:
        """``[0, cumsum(total_s)]`` (read-only), for pricing any run of layers by a difference."""
        prefix = self._totals.get("prefix")
        if prefix is None:
            prefix = np.concatenate([[0.0], np.cumsum(self.total_s)])
            prefix.setflags(write=False)
            self._totals["prefix"] = prefix
        return prefix  # type: ignore[return-value]

    @property
    def tp_comm_forward_s(self) -> np.ndarray:
        return self.tp_comm_s / 2 if self.tp_comm_fwd_s is None else self.tp_comm_fwd_s

    def segment(self, a: int, b: int) -> Segment:
        """Sums and maxima of layers ``[a, b)`` (``a < b``), computed once per table and segment.

        The values are the slices' own numpy reductions (not prefix-sum differences, which round
        differently), so cached and uncached pricing agree exactly.
        """
        hit = self._segments.get((a, b))
        if hit is None:
            hit = Segment(
                fwd_s=float(self.fwd_s[a:b].sum()), bwd_input_s=float(self.bwd_input_s[a:b].sum()),
                bwd_weight_s=float(self.bwd_weight_s[a:b].sum()), recompute_s=float(self.recompute_s[a:b].sum()),
                tp_comm_s=float(self.tp_comm_s[a:b].sum()), tp_comm_fwd_s=float(self.tp_comm_forward_s[a:b].sum()),
                stored_act_bytes=float(self.stored_act_bytes[a:b].sum()),
                work_act_max=float(self.work_act_bytes[a:b].max()), output_max=float(self.output_bytes[a:b].max()),
                param_max=float(self.params[a:b].max()), params=_stage_params(self, a, b))
            self._segments[(a, b)] = hit
        return hit

    def matrices(self) -> dict[str, np.ndarray]:
        """Per-segment sums and maxima, ``[i, j]`` for layers [i, j), computed once per table."""
        if self._matrices is None:
            n = len(self.params)
            P = np.concatenate([[0.0], np.cumsum(self.params)])
            S = np.concatenate([[0.0], np.cumsum(self.stored_act_bytes)])
            params = P[None, :] - P[:, None]
            spans: dict[str, tuple[int, int]] = {}
            for entries in self.tied:
                for name, numel, owner in entries:
                    spans[name] = (numel, owner)
            i = np.arange(n + 1)[:, None]
            j = np.arange(n + 1)[None, :]
            for name, (numel, owner) in sorted(spans.items()):
                # held by [i, j) when some user u is inside (i <= u < j) and its owner is not (i > owner)
                users = np.array([u for u, t in enumerate(self.tied) if any(x[0] == name for x in t)])
                # the first user at or after each start ii (n + 1: none), users being ascending
                after = np.searchsorted(users, np.arange(n + 1))
                first_user = np.where(after < len(users), users[np.minimum(after, len(users) - 1)], n + 1)[:, None]
                params = params + numel * ((i > owner) & (first_user < j))
            self._matrices = {"params": params, "stored": S[None, :] - S[:, None],
                              "work_out": _range_max(self.work_act_bytes) + 2 * _range_max(self.output_bytes),
                              "param_max": _range_max(self.params)}
        return self._matrices


TP_PRICING = ("ilp", "megatron", "none")


def layer_table(graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int, sequence_parallel: bool,
                recompute: str, c: CostConstants, dtype: str | None = None, tp_pricing: str = "ilp") -> LayerTable:
    """Seconds and bytes per layer and micro-batch on one device of a ``tp``-way group.

    Recomputation (Chen et al. 2016; Korthikanti et al. 2022): ``none`` stores what autograd
    saves; ``selective`` drops the attention scores (softmax, dropout mask and output:
    ``attention_activation_bytes``) and repeats the attention core in backward; ``full`` stores
    only each layer's input, repeats the whole forward (its tensor-parallel collectives too) and
    holds one layer's full activations while it is recomputed.

    Tensor-parallel communication (``tp > 1``), by ``tp_pricing``:

    * ``"ilp"`` (default): each layer's forward and backward collectives in the intra-op ILP's
      optimum for the model on the real tp group (:func:`planner.intra_op.pricing.tp_pricing`,
      cached; the plan's placements are that same solve). When the ILP cannot be used the table
      falls back to the Megatron count and says why in ``tp_note`` (``tp_source="megatron"``).
    * ``"megatron"``: :func:`tp_collectives`' all-reduces (with sequence parallelism each is the
      reduce-scatter + all-gather Megatron-SP runs), priced by :mod:`planner.cost.comm`.
    * ``"none"``: no tp communication, a lower bound of both (the search's cheap bounds).

    Compute, parameters and activations stay the calibrated per-layer figures for Megatron's split
    (:func:`planner.cost.compute.layer_times`, :func:`~planner.cost.compute.activation_shard`): the
    ILP's model axis splits every weight it can (``P / tp``, as the memory model counts), and on the
    traced transformers its optimum splits the same ops Megatron does.
    """
    if tp_pricing not in TP_PRICING:
        raise ValueError(f"tp_pricing: got {tp_pricing!r}; use one of {list(TP_PRICING)}")
    dtype = dtype or graph.dtype
    device = cluster.device
    tp_group = strided_group(cluster, tp, 1)
    n = graph.num_layers
    ilp = None
    source, note = "", ""
    if tp > 1:
        source = tp_pricing
        if tp_pricing == "ilp":
            from planner.intra_op.pricing import tp_pricing as ilp_tp_pricing

            ilp = ilp_tp_pricing(graph, cluster, tp=tp, micro_batch=micro_batch,
                                 sequence_parallel=sequence_parallel, c=c, dtype=dtype)
            note = ilp.note()
            if ilp.source != "ilp":
                source, ilp = "megatron", None
    arr = {k: np.zeros(n) for k in ("f", "b", "w", "r", "tc", "tcf", "st", "wk", "p", "o")}
    by_signature: dict[str, object] = {}
    for i, layer in enumerate(graph.layers):
        t = by_signature.get(layer.signature)
        if t is None:  # repeated blocks have equal signatures and equal costs
            t = layer_times(layer, micro_batch=micro_batch, tp=tp, sequence_parallel=sequence_parallel,
                            device=device, dtype=dtype, c=c,
                            gemm=cluster.groups[0].gemm if cluster.is_homogeneous else None)
            by_signature[layer.signature] = t
        arr["f"][i], arr["b"][i], arr["w"][i] = t.fwd_s, t.bwd_input_s, t.bwd_weight_s
        if ilp is not None:
            tc_fwd, tc_bwd = ilp.fwd_s[i], ilp.bwd_s[i]
        elif tp > 1 and tp_pricing != "none":
            tc_fwd, tc_bwd = megatron_tp_s(layer, dtype=dtype, micro_batch=micro_batch, group=tp_group,
                                           sequence_parallel=sequence_parallel, c=c)
        else:
            tc_fwd = tc_bwd = 0.0
        arr["tcf"][i], arr["tc"][i] = tc_fwd, tc_fwd + tc_bwd
        shard = activation_shard(layer, tp, sequence_parallel)
        full = layer.activation_bytes * shard * micro_batch
        if recompute == "none":
            arr["st"][i] = full
        elif recompute == "selective":
            attention = layer.attention_activation_bytes * shard * micro_batch
            arr["st"][i] = full - attention
            arr["wk"][i] = attention
            arr["r"][i] = t.attention_fwd_s
        else:
            arr["st"][i] = layer.input_bytes * micro_batch / (tp if sequence_parallel else 1)
            arr["wk"][i] = full
            arr["r"][i] = t.fwd_s + tc_fwd
        if i == n - 1:  # the loss reads the last layer's output (vocabulary-parallel under tp)
            loss_s = loss_traffic_s(layer, micro_batch=micro_batch, tp=tp, dtype=dtype, cluster=cluster, c=c)
            arr["f"][i] += loss_s / 3
            arr["b"][i] += 2 * loss_s / 3
            if recompute == "full":
                arr["r"][i] += loss_s / 3
        arr["p"][i] = layer.param_count
        arr["o"][i] = layer.output_bytes * micro_batch / (tp if sequence_parallel else 1)
    tied = [[(t.name, t.numel, t.owner) for t in layer.tied_params] for layer in graph.layers]
    return LayerTable(fwd_s=arr["f"], bwd_input_s=arr["b"], bwd_weight_s=arr["w"], recompute_s=arr["r"],
                      tp_comm_s=arr["tc"], stored_act_bytes=arr["st"], work_act_bytes=arr["wk"], params=arr["p"],
                      output_bytes=arr["o"], tied=tied, tp_comm_fwd_s=arr["tcf"], dtype=dtype, tp_source=source,
                      tp_note=note)


@dataclass
class StepPrediction:
    step_time_s: float
    mfu: float
    fits: bool
    memory_per_stage: list[MemoryParts]
    time_breakdown_s: dict[str, float]
    stage_times_s: list[float]
    bottleneck_stage: int
    binding: list[str]
    memory_limit_bytes: float
    schedule_result: object = None
    notes: list[str] = field(default_factory=list)
    # Per pipeline position (mixed clusters: each device type's own limit; empty when not set).
    memory_limit_per_stage_bytes: list[float] = field(default_factory=list)
    stage_device_names: list[str] = field(default_factory=list)
    # Per chunk, in model order: (forward, backward-input, backward-weight) seconds of one micro-batch,
    # as the schedule was priced (communication and pipeline-step overheads included).
    chunk_phase_times_s: list[tuple[float, float, float]] = field(default_factory=list)

    @property
    def peak_memory_bytes(self) -> float:
        return max(m.total for m in self.memory_per_stage)


def _chunks_of_device(boundaries: list[tuple[int, int]], devices: tuple[int, ...],
                      device: int) -> list[tuple[int, int]]:
    """The chunks ``device`` runs, by the schedule's placement (V-shapes fold back; never j % pp)."""
    return [boundaries[j] for j in range(len(boundaries)) if devices[j] == device]


def evaluate(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, boundaries: list[tuple[int, int]],
             c: CostConstants, *, table: LayerTable | None = None) -> StepPrediction:
    """Price ``cfg`` with ``boundaries`` (pp × virtual_stages contiguous chunks, in model order)."""
    from planner import schedules
    from planner.schedules.closed_form import in_flight_per_device, step_time

    p, v, m = cfg.pp, cfg.virtual_stages, cfg.num_micro_batches
    assert len(boundaries) == p * v, (len(boundaries), p, v)
    devices = schedules.chunk_devices(cfg.schedule, p, v)  # chunk -> device, as the schedule places it
    if table is None:
        table = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                            sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c)
    # Each pipeline position on its own device type (one table for all on a homogeneous cluster).
    pos = [_Position(table, cluster, usable_memory_bytes(cluster, c), cluster.device.name)] * p \
        if cluster.is_homogeneous else _positions(graph, cluster, cfg, c, table.dtype)
    fwd, bin_, bw = [], [], []
    # A pipeline runs each chunk's micro-batch as its own step: wait on the received activation, then
    # launch the chunk's kernels, so the host's lead over the device is lost at every step.
    step_overhead = c.pipeline_step_overhead_s if p > 1 else 0.0
    for j, (a, b) in enumerate(boundaries):
        s = pos[devices[j]].table.segment(a, b)
        comm_f = s.tp_comm_fwd_s
        comm_b = s.tp_comm_s - comm_f
        fwd.append(max(s.fwd_s + comm_f, 1e-12) + step_overhead)
        bin_.append(s.bwd_input_s + comm_b + s.recompute_s + step_overhead)
        bw.append(s.bwd_weight_s)
    p2p = _pipeline_p2p_s(table, boundaries, devices, cfg, cluster, c)
    result = schedules.estimate(cfg.schedule, p=p, m=m, v=v, fwd_s=fwd, bwd_input_s=bin_, bwd_weight_s=bw,
                                p2p_s=p2p)
    pipeline_s = result.step_time_s
    if p2p > 0:
        no_p2p_s = step_time(cfg.schedule, p=p, m=m, v=v, fwd_s=fwd, bwd_input_s=bin_, bwd_weight_s=bw, p2p_s=0.0)
    else:
        no_p2p_s = pipeline_s

    # Per device: data-parallel gradient sync (and ZeRO gathers), tied-embedding sync, optimizer.
    w_b, g_b, _ = c.state_bytes(table.dtype)
    dp_group: Group = strided_group(cluster, cfg.dp, cfg.tp)
    bw_mem = cluster.device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
    per_device = [sum(fwd[j] + bin_[j] + bw[j] for j in range(len(boundaries)) if devices[j] == d) for d in range(p)]
    dp_exposed, fsdp_exposed, tied_sync, optim_s = [], [], [], []
    tied_holders = _tied_holder_devices(table, boundaries, cfg) if p > 1 else []
    for d in range(p):
        if not cluster.is_homogeneous:  # this position's own replicas, links and memory bandwidth
            dp_group = group_of_ranks(cluster, [(d * cfg.dp + i) * cfg.tp for i in range(cfg.dp)])
            bw_mem = pos[d].cluster.device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
        chunks = _chunks_of_device(boundaries, devices, d)
        params = sum(stage_params(table, a, b) for a, b in chunks) / cfg.tp
        grads, weights = g_b * params, w_b * params
        if cfg.zero_stage == 0:
            reduce, gather = all_reduce_s(grads, dp_group, c), 0.0
        elif cfg.zero_stage < 3:
            reduce, gather = reduce_scatter_s(grads, dp_group, c), all_gather_s(weights, dp_group, c)
        else:  # gradients are reduce-scattered per micro-batch, parameters gathered on use
            reduce, gather = 0.0, 0.0
        if cfg.overlap_grad_reduce:  # buckets reduce while the last micro-batch's backward runs
            reduce = max(0.0, reduce - sum(bin_[j] + bw[j] for j in range(len(boundaries)) if devices[j] == d))
        dp_exposed.append(reduce + gather)
        if cfg.zero_stage >= 3 and cfg.dp > 1:
            per_mb = 2 * all_gather_s(weights, dp_group, c) + reduce_scatter_s(grads, dp_group, c)
            fsdp_exposed.append(m * max(0.0, per_mb - per_device[d]))  # prefetch hides what compute covers
        else:
            fsdp_exposed.append(0.0)
        tied_sync.append(_tied_sync_s(table, boundaries, d, cfg, cluster, c, g_b, tied_holders))
        shard = cfg.dp if cfg.zero_stage >= 1 else 1
        optim_s.append(c.optimizer_step_bytes_per_param * params / shard / bw_mem)
    tail = [dp_exposed[d] + fsdp_exposed[d] + tied_sync[d] + optim_s[d] for d in range(p)]
    worst_tail = int(np.argmax(tail))
    step = pipeline_s + tail[worst_tail]

    # Breakdown along the busiest device: its own work, then what the pipeline adds, then the tail.
    busiest = int(np.argmax(per_device))
    chunks_b = _chunks_of_device(boundaries, devices, busiest)
    tb = pos[busiest].table

    segs_b = [tb.segment(a, b) for a, b in chunks_b]

    def seg(field_name: str) -> float:
        return m * sum(getattr(s, field_name) for s in segs_b)

    compute = seg("fwd_s") + seg("bwd_input_s") + seg("bwd_weight_s")
    recomp, tp_comm = seg("recompute_s"), seg("tp_comm_s")
    steps = 2 * m * len(chunks_b) * step_overhead  # the busiest device's pipeline-step overheads
    bubble = no_p2p_s - compute - recomp - tp_comm - steps
    if -1e-9 * no_p2p_s < bubble < 0:  # rounding: the busiest device's work is a lower bound of the pipeline
        bubble = 0.0
    dp_key = "dp_comm_exposed_after_overlap" if cfg.overlap_grad_reduce else "dp_comm_exposed"
    breakdown = {
        "compute": compute,
        "recompute": recomp,
        "tp_comm": tp_comm,
        "pp_bubble": bubble,
        "pp_step_overhead": steps,
        "pp_p2p_exposed": pipeline_s - no_p2p_s,
        dp_key: dp_exposed[worst_tail],
        "zero3_gather_exposed": fsdp_exposed[worst_tail],
        "embedding_sync": tied_sync[worst_tail],
        "optimizer": optim_s[worst_tail],
    }
    notes = []
    if cluster.is_homogeneous and cfg.tp > cluster.devices_per_node:
        notes.append(f"tensor parallelism spans {cfg.tp // cluster.devices_per_node} nodes: its collectives "
                     f"({tp_comm:.3g} s of this step) cross the network in every layer")
    if cfg.overlap_grad_reduce:
        notes.append("data-parallel gradient reduction overlaps the last micro-batch's backward; "
                     f"{dp_key} is what remains exposed")
    if any(grp.collectives is not None for grp in cluster.groups):  # what the measured curves priced (cluster.md)
        tp_bytes = [x * cfg.micro_batch_size for lay in graph.layers for x in sum(tp_collectives(lay, table.dtype), [])]
        dp_bytes = [g_b * sum(stage_params(table, a, b) for a, b in _chunks_of_device(boundaries, devices, d)) / cfg.tp
                    for d in range(p)]
        p2p_bytes = [float(table.output_bytes[b - 1]) for _, b in boundaries[:-1]]
        notes.extend(step_collective_notes(cluster, cfg, c, tp_bytes=tp_bytes, dp_bytes=dp_bytes, p2p_bytes=p2p_bytes))

    limits = [x.limit for x in pos]
    limit = min(limits)
    memory: list[MemoryParts] = []
    flights = in_flight_per_device(cfg.schedule, p=p, m=m, v=v)
    for d in range(p):
        chunks = _chunks_of_device(boundaries, devices, d)
        memory.append(stage_memory(table, chunks, in_flight=flights[d], cfg=cfg, c=c, is_last=(d == devices[-1])))
    binding = []
    for d in range(p):
        if memory[d].total > limits[d]:
            binding.append("memory (over the limit)")
        elif memory[d].total > 0.9 * limits[d]:
            binding.append("memory")
        elif d == busiest and pipeline_s > 0:
            comm_share = (tp_comm + dp_exposed[d] + fsdp_exposed[d]) / step if step > 0 else 0.0
            binding.append("communication" if comm_share > 0.3 else "compute")
        else:
            binding.append("none (waits on the bottleneck stage)")
    flops = graph.train_flops * cfg.global_batch
    if cluster.is_homogeneous:
        peak = cluster.device.peak(table.dtype) * cfg.world_size
    else:  # every device at its own peak: MFU against what the cluster could do
        peak = sum(g.device.peak(table.dtype) * g.num_devices for g in cluster.groups)
        notes.append("mixed cluster: pipeline positions run on " + ", ".join(
            f"{d}:{x.device_name}" for d, x in enumerate(pos)) + " (each priced with its own speed and memory)")
    mfu = flops / (step * peak) if step > 0 else 0.0
    return StepPrediction(step_time_s=step, mfu=mfu, fits=all(mp.total <= lim for mp, lim in zip(memory, limits)),
                          memory_per_stage=memory, time_breakdown_s=breakdown, stage_times_s=per_device,
                          bottleneck_stage=busiest, binding=binding, memory_limit_bytes=limit,
                          schedule_result=result, notes=notes, memory_limit_per_stage_bytes=limits,
                          stage_device_names=[x.device_name for x in pos],
                          chunk_phase_times_s=list(zip(fwd, bin_, bw)))


def _pipeline_p2p_s(table: LayerTable, boundaries: list[tuple[int, int]], devices: tuple[int, ...],
                    cfg: ParallelConfig, cluster: ClusterSpec, c: CostConstants) -> float:
    """Seconds to hand one micro-batch's activation (or its gradient) across the slowest pipeline cut.

    Every cut is priced on the link it crosses. Rank ``(k·dp + d)·tp + t`` of position ``k`` sends to
    the same ``(d, t)`` of the next chunk's position: the node's link (NVLink) when every such pair
    shares a node, else the network: the node group's when both ends are in one group, else the
    slower of the two groups' (``p2p_s`` on the whole cluster). So a node holding several stages
    sends over NVLink inside and over its NICs at the cuts between nodes, wherever they fall.
    With Megatron's scatter/gather each tp rank sends ``1/tp`` on its own link and the receiver
    all-gathers over its own group; sequence-parallel outputs are already split. Consecutive chunks
    on one device (the fold of a V-shape) hand over in memory.

    Ranks, nodes and node groups are contiguous ranges, so every pair shares a node exactly when the
    span from the lower position's first rank to the higher one's last lies in one node.
    """
    if len(boundaries) <= 1:
        return 0.0
    per = cfg.dp * cfg.tp
    worst = 0.0
    for j, (_, b) in enumerate(boundaries[:-1]):
        src, dst = devices[j], devices[j + 1]
        if src == dst:
            continue
        lo, hi = min(src, dst) * per, (max(src, dst) + 1) * per - 1
        group = cluster.group_index_of_rank(lo)
        if group == cluster.group_index_of_rank(hi):
            net = cluster if len(cluster.groups) == 1 else cluster.group_view(group)
            same_node = cluster.node_of_rank(lo) == cluster.node_of_rank(hi)
        else:
            net, same_node = cluster, False
        nbytes = float(table.output_bytes[b - 1])
        if cfg.tp > 1 and not cfg.sequence_parallel and c.pp_scatter_gather:
            receiver = cluster.group_view(cluster.group_index_of_rank(dst * per))
            t = p2p_s(nbytes / cfg.tp, same_node=same_node, cluster=net, c=c) + all_gather_s(
                nbytes, strided_group(receiver, cfg.tp, 1), c)
        else:
            t = p2p_s(nbytes, same_node=same_node, cluster=net, c=c)
        worst = max(worst, t)
    return worst


@dataclass(frozen=True)
class _Position:
    """What one pipeline position runs on: its layer table, its device type's cluster view, its
    usable memory per device and the device's name."""

    table: LayerTable
    cluster: ClusterSpec
    limit: float
    device_name: str


_GROUP_TABLES: dict[tuple, tuple[CostGraph, LayerTable]] = {}
_GROUP_TABLES_MAX = 512


def group_layer_tables(graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int,
                       sequence_parallel: bool, recompute: str, c: CostConstants,
                       dtype: str | None = None, tp_pricing: str = "ilp") -> list[LayerTable]:
    """:func:`layer_table` of every node group of ``cluster`` on its own device and links, in group order.

    Memoised (the search prices many configurations with the same tables); an entry keeps its
    graph alive so that an ``id`` is never reused for another graph while cached.
    """
    out = []
    for gi in range(len(cluster.groups)):
        view = cluster.group_view(gi)
        key = (id(graph), view.fingerprint(), micro_batch, tp, sequence_parallel, recompute, c, dtype, tp_pricing)
        hit = _GROUP_TABLES.get(key)
        if hit is None or hit[0] is not graph:
            if len(_GROUP_TABLES) >= _GROUP_TABLES_MAX:
                _GROUP_TABLES.clear()
            hit = (graph, layer_table(graph, view, micro_batch=micro_batch, tp=tp, sequence_parallel=sequence_parallel,
                                      recompute=recompute, c=c, dtype=dtype, tp_pricing=tp_pricing))
            _GROUP_TABLES[key] = hit
        out.append(hit[1])
    return out


def position_layer_tables(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants,
                          dtype: str | None = None) -> list[LayerTable]:
    """The layer table :func:`evaluate` prices each pipeline position of a mixed cluster with."""
    return [x.table for x in _positions(graph, cluster, cfg, c, dtype or graph.dtype)]


def _positions(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants,
               dtype: str) -> list[_Position]:
    """Each pipeline position of a mixed cluster with its own device type.

    Position ``k`` holds ranks ``[k·dp·tp, (k+1)·dp·tp)``. One whose ranks straddle node groups runs
    in lock step (tp all-reduces every layer, dp all-reduces every step), so it is priced at its
    slowest member's speed and held to its smallest member's memory (docs/inter-op.md).
    """
    tables = group_layer_tables(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                                sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c, dtype=dtype)
    out = []
    for span in cluster.position_groups(cfg.pp, cfg.dp * cfg.tp):
        slow = cluster.slowest_group(span)
        limit = min(usable_memory_bytes(cluster.group_view(g), c) for g in span)
        name = "+".join(cluster.groups[g].device.name for g in span)
        out.append(_Position(tables[slow], cluster.group_view(slow), limit, name))
    return out


def _tied_holder_devices(table: LayerTable, boundaries: list[tuple[int, int]],
                         cfg: ParallelConfig) -> list[tuple[int, set[int]]]:
    """``(numel, pipeline devices holding it)`` per tied parameter, in first-use order.

    A device holds a tied parameter when one of its chunks owns or uses it. Computed once per
    :func:`evaluate` call (it does not depend on the device asked about), not once per device.
    """
    holders: dict[str, tuple[int, set[int]]] = {}
    for i, entries in enumerate(table.tied):
        for name, numel, owner in entries:
            holders.setdefault(name, (numel, set()))[1].update((owner, i))
    if not holders:
        return []
    from planner.schedules import chunk_devices

    chunk_device = chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
    starts = [a for a, _ in boundaries]  # contiguous chunks in model order: layer i is in the last start <= i
    return [(numel, {chunk_device[bisect.bisect_right(starts, i) - 1] for i in layers})
            for numel, layers in holders.values()]


def _tied_sync_s(table: LayerTable, boundaries: list[tuple[int, int]], device: int, cfg: ParallelConfig,
                 cluster: ClusterSpec, c: CostConstants, grad_bytes: float,
                 holders: list[tuple[int, set[int]]] | None = None) -> float:
    """All-reduce of tied parameters' gradients between the pipeline devices that hold them
    (Megatron's embedding group: the first and last stage share the word embedding).

    ``holders`` is :func:`_tied_holder_devices` of the same arguments, when the caller has it.
    """
    if cfg.pp <= 1:
        return 0.0
    if holders is None:
        holders = _tied_holder_devices(table, boundaries, cfg)
    dpn = cluster.devices_per_node if cluster.is_homogeneous else 1
    total = 0.0
    for numel, holders_dev in holders:
        if device not in holders_dev or len(holders_dev) < 2:
            continue
        span = (max(holders_dev) - min(holders_dev)) * cfg.dp * cfg.tp  # rank distance between the holders
        group = Group(size=len(holders_dev), nodes=1 if span < dpn else len(holders_dev), per_node=1,
                      intra_bw=cluster.intra_node.bandwidth_bytes_per_s, intra_latency_s=cluster.intra_node.latency_s,
                      nic_bw=min(g.inter_node.bandwidth_bytes_per_s / g.devices_per_node for g in cluster.groups),
                      inter_latency_s=cluster.inter_node.latency_s)
        total += all_reduce_s(grad_bytes * numel / cfg.tp, group, c)
    return total
