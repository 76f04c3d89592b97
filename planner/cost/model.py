"""Predict one training step of a configuration: time, memory per device, MFU, and why.

Two layers of API:

* :class:`LayerTable` holds per-layer arrays (seconds per micro-batch, stored activation bytes,
  parameters) for one ``(micro-batch, tp, sequence-parallel, recompute)`` choice, so the stage
  solvers can price any contiguous run of layers with prefix sums.
* :func:`evaluate` prices a full configuration with given stage boundaries and returns a
  :class:`StepPrediction` whose time breakdown adds up to the step time.

Memory per device (bytes), for a stage holding parameters ``P`` split ``tp`` ways:
  weights ``2·P/tp`` (÷dp under ZeRO-3), gradients ``2·P/tp`` (÷dp under ZeRO-2/3),
  optimizer ``12·P/tp`` (÷dp under ZeRO-1/2/3),
  activations ``in_flight(schedule, stage) × Σ stored(layer) × micro-batch``, where stored is
  what autograd saves (from the trace) times the tensor-parallel shard, minus attention scores
  under selective recomputation, or only each layer's input under full recomputation (plus
  one layer's full activations while it is recomputed), and temporary buffers (send/receive
  and the loss workspace on the last stage). A device fits when the sum is at most
  ``usable_fraction × memory − reserved`` (see CostConstants).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from planner.cluster import ClusterSpec
from planner.cost.comm import Group, all_gather_s, all_reduce_s, p2p_s, reduce_scatter_s, strided_group
from planner.cost.compute import layer_times
from planner.cost.constants import CostConstants
from planner.plan import ParallelConfig
from planner.trace.graph import CostGraph, Layer


def _linear_count(layer: Layer) -> int:
    return sum(1 for op in layer.op_costs if op.kind in ("addmm", "mm", "convolution"))


def _range_max(arr: np.ndarray) -> np.ndarray:
    n = len(arr)
    out = np.zeros((n + 1, n + 1))
    for i in range(n):
        out[i, i + 1:] = np.maximum.accumulate(arr[i:])
    return out


def _tied_spans(tied: list[list[tuple[str, int, int]]]) -> list[tuple[str, int, int]]:
    """Each tied parameter once: (name, numel, owner layer)."""
    spans: dict[str, tuple[str, int, int]] = {}
    for entries in tied:
        for name, numel, owner in entries:
            spans[name] = (name, numel, owner)
    return sorted(spans.values())


def tp_allreduces(layer: Layer) -> int:
    """All-reduces per forward under Megatron-style tensor parallelism.

    Column- then row-parallel pairs of weight GEMMs need one all-reduce per pair; a layer with
    parameters but no GEMM (a vocabulary-parallel embedding) needs one. Refined per op by the
    intra-op ILP where it runs.
    """
    n = _linear_count(layer)
    if n:
        return math.ceil(n / 2)
    return 1 if layer.param_count > 0 else 0


@dataclass
class LayerTable:
    """Per-layer, per-micro-batch figures for one (micro-batch, tp, sp, recompute) choice."""

    fwd_s: np.ndarray
    bwd_input_s: np.ndarray
    bwd_weight_s: np.ndarray
    recompute_s: np.ndarray
    tp_comm_s: np.ndarray  # forward + backward
    stored_act_bytes: np.ndarray  # held per in-flight micro-batch
    work_act_bytes: np.ndarray  # extra working set while one layer is recomputed (full recompute)
    params: np.ndarray  # own parameters (not divided by tp)
    output_bytes: np.ndarray  # per micro-batch, per device
    tied: list[list[tuple[str, int, int]]]
    _matrices: dict[str, np.ndarray] | None = None

    @property
    def total_s(self) -> np.ndarray:
        return self.fwd_s + self.bwd_input_s + self.bwd_weight_s + self.recompute_s + self.tp_comm_s

    def matrices(self) -> dict[str, np.ndarray]:
        """Per-segment sums and maxima, ``[i, j]`` for layers [i, j), computed once per table."""
        if self._matrices is None:
            n = len(self.params)
            P = np.concatenate([[0.0], np.cumsum(self.params)])
            S = np.concatenate([[0.0], np.cumsum(self.stored_act_bytes)])
            params = P[None, :] - P[:, None]
            for name, numel, owner in _tied_spans(self.tied):
                # held by [i, j) when some user u is inside (i <= u < j) and its owner is not (i > owner)
                i = np.arange(n + 1)[:, None]
                users = np.array([u for u, t in enumerate(self.tied) if any(x[0] == name for x in t)])
                first_user_at_or_after_i = np.array([users[users >= ii].min() if (users >= ii).any() else n + 1
                                                     for ii in range(n + 1)])[:, None]
                j = np.arange(n + 1)[None, :]
                params = params + numel * ((i > owner) & (first_user_at_or_after_i < j))
            work = _range_max(self.work_act_bytes)
            out = _range_max(self.output_bytes)
            self._matrices = {"params": params, "stored": S[None, :] - S[:, None], "work_out": work + 2 * out}
        return self._matrices


def layer_table(graph: CostGraph, cluster: ClusterSpec, *, micro_batch: int, tp: int, sequence_parallel: bool,
                recompute: str, c: CostConstants, dtype: str | None = None) -> LayerTable:
    dtype = dtype or graph.dtype
    device = cluster.device
    tp_group = strided_group(cluster, tp, 1)
    n = graph.num_layers
    arr = {k: np.zeros(n) for k in ("f", "b", "w", "r", "tc", "st", "wk", "p", "o")}
    by_signature: dict[str, object] = {}
    for i, layer in enumerate(graph.layers):
        t = by_signature.get(layer.signature)
        if t is None:  # repeated blocks have equal signatures and equal costs
            t = layer_times(layer, micro_batch=micro_batch, tp=tp, sequence_parallel=sequence_parallel,
                            device=device, dtype=dtype, c=c)
            by_signature[layer.signature] = t
        arr["f"][i], arr["b"][i], arr["w"][i] = t.fwd_s, t.bwd_input_s, t.bwd_weight_s
        out_bytes = layer.output_bytes * micro_batch
        ar = all_reduce_s(out_bytes, tp_group, c) if tp > 1 else 0.0
        arr["tc"][i] = 2 * tp_allreduces(layer) * ar
        if sequence_parallel or layer.activation_bytes <= 0:
            shard = 1.0 / tp
        else:
            rep = min(1.0, layer.replicated_activation_bytes / layer.activation_bytes)
            shard = rep + (1.0 - rep) / tp
        full = layer.activation_bytes * shard * micro_batch
        if recompute == "none":
            arr["st"][i] = full
        elif recompute == "selective":
            arr["st"][i] = (layer.activation_bytes - layer.attention_activation_bytes) * shard * micro_batch
            arr["r"][i] = t.attention_fwd_s
        else:
            arr["st"][i] = layer.input_bytes * micro_batch / (tp if sequence_parallel else 1)
            arr["wk"][i] = full
            arr["r"][i] = t.fwd_s + arr["tc"][i] / 2
        arr["p"][i] = layer.param_count
        arr["o"][i] = out_bytes / (tp if sequence_parallel else 1)
    tied = [[(t.name, t.numel, t.owner) for t in layer.tied_params] for layer in graph.layers]
    return LayerTable(fwd_s=arr["f"], bwd_input_s=arr["b"], bwd_weight_s=arr["w"], recompute_s=arr["r"],
                      tp_comm_s=arr["tc"], stored_act_bytes=arr["st"], work_act_bytes=arr["wk"], params=arr["p"],
                      output_bytes=arr["o"], tied=tied)


def stage_params(table: LayerTable, start: int, stop: int) -> float:
    """Parameters a stage holds: its own plus tied ones owned outside it (counted once each)."""
    own = float(table.params[start:stop].sum())
    extra: dict[str, int] = {}
    for i in range(start, stop):
        for name, numel, owner in table.tied[i]:
            if not start <= owner < stop:
                extra[name] = numel
    return own + sum(extra.values())


@dataclass(frozen=True)
class MemoryParts:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    temporary: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.temporary

    def as_dict(self) -> dict[str, int]:
        return {"weights": int(self.weights), "gradients": int(self.gradients), "optimizer": int(self.optimizer),
                "activations": int(self.activations), "temporary": int(self.temporary), "total": int(self.total)}


def stage_memory(table: LayerTable, chunks: list[tuple[int, int]], *, in_flight: float, cfg: ParallelConfig,
                 c: CostConstants, is_last: bool) -> MemoryParts:
    """Memory of one device holding ``chunks`` (one per virtual stage) of layers."""
    params = sum(stage_params(table, a, b) for a, b in chunks) / cfg.tp
    dp = cfg.dp
    weights = c.weight_bytes * params / (dp if cfg.zero_stage >= 3 else 1)
    grads = c.grad_bytes * params / (dp if cfg.zero_stage >= 2 else 1)
    optim = c.optimizer_bytes * params / (dp if cfg.zero_stage >= 1 else 1)
    stored = sum(float(table.stored_act_bytes[a:b].sum()) for a, b in chunks)
    work = max(float(table.work_act_bytes[a:b].max()) for a, b in chunks)
    acts = in_flight * stored + work
    out = max(float(table.output_bytes[a:b].max()) for a, b in chunks)
    temp = 2 * out  # send and receive buffers
    if is_last:
        last = chunks[-1][1] - 1
        temp += 2 * float(table.output_bytes[last]) / (1 if cfg.sequence_parallel else cfg.tp)  # fp32 logits
    return MemoryParts(weights, grads, optim, acts, temp)


def usable_memory_bytes(cluster: ClusterSpec, c: CostConstants) -> float:
    return cluster.device.memory_bytes * c.allocator_usable_fraction - c.reserved_bytes


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

    @property
    def peak_memory_bytes(self) -> float:
        return max(m.total for m in self.memory_per_stage)


def _chunks_of_device(boundaries: list[tuple[int, int]], pp: int, device: int) -> list[tuple[int, int]]:
    return [boundaries[j] for j in range(len(boundaries)) if j % pp == device]


def evaluate(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, boundaries: list[tuple[int, int]],
             c: CostConstants, *, table: LayerTable | None = None) -> StepPrediction:
    """Price ``cfg`` with ``boundaries`` (pp × virtual_stages contiguous chunks, in model order)."""
    from planner import schedules

    p, v, m = cfg.pp, cfg.virtual_stages, cfg.num_micro_batches
    assert len(boundaries) == p * v, (len(boundaries), p, v)
    if table is None:
        table = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                            sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c)
    same_node = cfg.dp * cfg.tp < (cluster.devices_per_node if cluster.is_homogeneous else 1)
    fwd, bin_, bw, p2p_list = [], [], [], []
    for a, b in boundaries:
        comm_half = float(table.tp_comm_s[a:b].sum()) / 2
        fwd.append(float(table.fwd_s[a:b].sum()) + comm_half)
        bin_.append(float(table.bwd_input_s[a:b].sum()) + comm_half + float(table.recompute_s[a:b].sum()))
        bw.append(float(table.bwd_weight_s[a:b].sum()))
        p2p_list.append(p2p_s(float(table.output_bytes[b - 1]), same_node=same_node, cluster=cluster, c=c))
    p2p = max(p2p_list[:-1]) if len(p2p_list) > 1 else 0.0
    result = schedules.estimate(cfg.schedule, p=p, m=m, v=v, fwd_s=fwd, bwd_input_s=bin_, bwd_weight_s=bw,
                                p2p_s=p2p)
    pipeline_s = result.step_time_s

    # Data-parallel gradient reduction (and ZeRO-3 parameter gathers), per device, slowest device.
    dp_group: Group = strided_group(cluster, cfg.dp, cfg.tp)
    dp_exposed, optim_s = [], []
    for d in range(p):
        chunks = _chunks_of_device(boundaries, p, d)
        params = sum(stage_params(table, a, b) for a, b in chunks) / cfg.tp
        grad_bytes = c.grad_bytes * params
        if cfg.zero_stage == 0:
            sync = all_reduce_s(grad_bytes, dp_group, c)
        else:
            sync = reduce_scatter_s(grad_bytes, dp_group, c) + all_gather_s(c.weight_bytes * params, dp_group, c)
        if cfg.zero_stage >= 3:
            per_mb = 2 * all_gather_s(c.weight_bytes * params, dp_group, c) + reduce_scatter_s(grad_bytes, dp_group, c)
            compute_mb = sum(fwd[j] + bin_[j] + bw[j] for j in range(len(boundaries)) if j % p == d)
            sync += m * max(0.0, per_mb - compute_mb)
        if cfg.overlap_grad_reduce:
            last_bwd = sum(bin_[j] + bw[j] for j in range(len(boundaries)) if j % p == d)
            sync = max(0.0, sync - last_bwd)
        dp_exposed.append(sync)
        shard = cfg.dp if cfg.zero_stage >= 1 else 1
        optim_s.append(c.optimizer_step_bytes_per_param * params / shard
                       / (cluster.device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency))
    tail = [dp_exposed[d] + optim_s[d] for d in range(p)]
    step = pipeline_s + max(tail)

    # Breakdown along the busiest device: its work, the rest of the pipeline time is bubble.
    per_device = [sum(fwd[j] + bin_[j] + bw[j] for j in range(len(boundaries)) if j % p == d) for d in range(p)]
    busiest = int(np.argmax(per_device))
    chunks_b = _chunks_of_device(boundaries, p, busiest)
    compute = m * sum(float(table.fwd_s[a:b].sum() + table.bwd_input_s[a:b].sum() + table.bwd_weight_s[a:b].sum())
                      for a, b in chunks_b)
    tp_comm = m * sum(float(table.tp_comm_s[a:b].sum()) for a, b in chunks_b)
    recomp = m * sum(float(table.recompute_s[a:b].sum()) for a, b in chunks_b)
    worst_tail = int(np.argmax(tail))
    breakdown = {
        "compute": compute,
        "recompute": recomp,
        "tp_comm": tp_comm,
        "pp_bubble_and_p2p": max(0.0, pipeline_s - compute - tp_comm - recomp),
        "dp_comm_exposed": dp_exposed[worst_tail],
        "optimizer": optim_s[worst_tail],
    }

    limit = usable_memory_bytes(cluster, c)
    memory: list[MemoryParts] = []
    for d in range(p):
        chunks = _chunks_of_device(boundaries, p, d)
        flight = schedules.in_flight(cfg.schedule, p=p, m=m, v=v, device=d)
        memory.append(stage_memory(table, chunks, in_flight=flight, cfg=cfg, c=c, is_last=(d == (p * v - 1) % p)))
    binding = []
    for d in range(p):
        if memory[d].total > limit:
            binding.append("memory (over the limit)")
        elif memory[d].total > 0.9 * limit:
            binding.append("memory")
        elif d == busiest and pipeline_s > 0:
            comm_share = (tp_comm + dp_exposed[d]) / step
            binding.append("communication" if comm_share > 0.3 else "compute")
        else:
            binding.append("none (waits on the bottleneck stage)")
    flops = graph.train_flops * cfg.global_batch
    peak = cluster.device.peak(graph.dtype) * cfg.world_size
    mfu = flops / (step * peak) if step > 0 else 0.0
    return StepPrediction(step_time_s=step, mfu=mfu, fits=all(mp.total <= limit for mp in memory),
                          memory_per_stage=memory, time_breakdown_s=breakdown, stage_times_s=per_device,
                          bottleneck_stage=busiest, binding=binding, memory_limit_bytes=limit,
                          schedule_result=result)


def stage_memory_matrix(table: LayerTable, cfg: ParallelConfig, c: CostConstants, *, p: int,
                        in_flight: list[float]):
    """``f(k)[i, j]``: memory of a stage holding layers [i, j) at position k (same formula as
    :func:`stage_memory` for one chunk), for the partition DP's matrix path."""
    mats = table.matrices()
    dp = cfg.dp
    per_param = (c.weight_bytes / (dp if cfg.zero_stage >= 3 else 1)
                 + c.grad_bytes / (dp if cfg.zero_stage >= 2 else 1)
                 + c.optimizer_bytes / (dp if cfg.zero_stage >= 1 else 1)) / cfg.tp
    base = per_param * mats["params"] + mats["work_out"]
    logits_shard = 1 if cfg.sequence_parallel else cfg.tp
    last_col = np.concatenate([[0.0], 2 * table.output_bytes / logits_shard])[None, :]

    def matrix(k: int) -> np.ndarray:
        mem = base + in_flight[k] * mats["stored"]
        return mem + last_col if k == p - 1 else mem

    return matrix


def stage_memory_vec(table: LayerTable, cfg: ParallelConfig, c: CostConstants, *, p: int,
                     in_flight: list[float]):
    """``f(j, k)``: memory of a stage holding layers [i, j) at position k, as a vector over all i.

    Same formula as :func:`stage_memory` for one chunk; used by the partition DP.
    """
    n = len(table.params)
    P = np.concatenate([[0.0], np.cumsum(table.params)])
    S = np.concatenate([[0.0], np.cumsum(table.stored_act_bytes)])
    dp = cfg.dp
    per_param = (c.weight_bytes / (dp if cfg.zero_stage >= 3 else 1)
                 + c.grad_bytes / (dp if cfg.zero_stage >= 2 else 1)
                 + c.optimizer_bytes / (dp if cfg.zero_stage >= 1 else 1)) / cfg.tp
    tied = [(u, name, numel, owner) for u in range(n) for name, numel, owner in table.tied[u]]
    logits_shard = 1 if cfg.sequence_parallel else cfg.tp

    def vec(j: int, k: int) -> np.ndarray:
        i = np.arange(j)
        params = P[j] - P[i]
        seen: set[str] = set()
        for u, name, numel, owner in tied:
            if u < j and name not in seen:
                # counted once per stage: for start i with owner < i <= (first user of name below j)
                users = [uu for uu, nn, _, _ in tied if nn == name and uu < j]
                first_user_max = max(users)
                params = params + numel * ((i > owner) & (i <= first_user_max))
                seen.add(name)
        work = np.maximum.accumulate(table.work_act_bytes[:j][::-1])[::-1]
        out = np.maximum.accumulate(table.output_bytes[:j][::-1])[::-1]
        mem = per_param * params + in_flight[k] * (S[j] - S[i]) + work + 2 * out
        if k == p - 1:
            mem = mem + 2 * table.output_bytes[j - 1] / logits_shard
        return mem

    return vec
