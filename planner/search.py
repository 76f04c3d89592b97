"""Joint search over parallel configurations: degrees, micro-batching, schedule, memory savers.

For every configuration the stage boundaries come from the exact partition DP
(:mod:`planner.inter_op.chain`), and the prediction from the cost model. Configurations are
enumerated in a fixed order (deterministic), and a configuration is skipped only when a *lower
bound* on its step time is already worse than the k-th best plan found: every device of a
synchronous pipeline must run all ``m`` micro-batches of its layers, so
``step ≥ m · Σ_layers t(layer) / pp`` (busiest device at least the average). The bound never
exceeds the true prediction, so pruning never discards the optimum (docs/search.md).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from planner import schedules
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import (
    LayerTable,
    StepPrediction,
    evaluate,
    layer_table,
    stage_memory,
    stage_memory_matrix,
    stage_memory_vec,
    usable_memory_bytes,
)
from planner.inter_op.chain import Partition, StageCosts, partition_dp, uniform_partition
from planner.inter_op.unconstrained import partition_unconstrained
from planner.plan import RECOMPUTE, ParallelConfig
from planner.trace.graph import CostGraph

# Synchronous schedules the runtime executes; the asynchronous ones (and Chimera) change the training
# semantics or need a runtime we do not have, so the search uses them only when asked (--schedules).
SYNC_DEFAULT = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-h2", "zb-v", "dualpipe-v")


@dataclass(frozen=True, kw_only=True)
class SearchSpace:
    """Which values each knob may take; ``None`` means "let the search choose"."""

    tp: tuple[int, ...] | None = None
    pp: tuple[int, ...] | None = None
    dp: tuple[int, ...] | None = None
    micro_batch_size: tuple[int, ...] | None = None
    schedules: tuple[str, ...] | None = None
    virtual_stages: tuple[int, ...] | None = None
    recompute: tuple[str, ...] = RECOMPUTE
    sequence_parallel: tuple[bool, ...] = (False, True)
    zero_stage: tuple[int, ...] = (0, 1, 2, 3)
    overlap_grad_reduce: bool = False
    max_micro_batch_size: int = 16
    partition: str = "balanced"  # "balanced" (exact DP) or "uniform" (equal layers per stage)


@dataclass
class Candidate:
    config: ParallelConfig
    boundaries: tuple[tuple[int, int], ...]
    prediction: StepPrediction
    partition_status: str = "optimal"

    @property
    def step_time_s(self) -> float:
        return self.prediction.step_time_s


@dataclass
class SearchResult:
    best: Candidate | None
    top: list[Candidate]
    evaluated: int
    pruned: int
    infeasible: int
    time_s: float
    timed_out: bool
    closest_misses: list[Candidate] = field(default_factory=list)
    # A proven lower bound on the optimum: the best's own time when the search finished, else the
    # smaller of that and the bound of the first family not yet visited (families go in bound order).
    lower_bound_s: float = 0.0
    # Configurations rejected by the memory lower bound alone: (bytes needed at least, config).
    memory_bound_misses: list[tuple[dict[str, float], ParallelConfig]] = field(default_factory=list)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pow2_upto(n: int) -> list[int]:
    out, x = [], 1
    while x <= n:
        out.append(x)
        x *= 2
    return out


def candidate_degrees(graph: CostGraph, cluster: ClusterSpec, global_batch: int,
                      space: SearchSpace) -> Iterable[tuple[int, int, int]]:
    """(tp, pp, dp) with tp·pp·dp = devices, tp within a node, pp ≤ layers, dp | global batch."""
    n = cluster.num_devices
    dpn = cluster.devices_per_node if cluster.is_homogeneous else min(g.devices_per_node for g in cluster.groups)
    tps = space.tp or tuple(t for t in _pow2_upto(dpn) if n % t == 0)
    for tp in tps:
        if n % tp:
            continue
        pps = space.pp or tuple(_divisors(n // tp))
        for pp in pps:
            if (n // tp) % pp or pp > graph.num_layers:
                continue
            dp = n // (tp * pp)
            if space.dp and dp not in space.dp:
                continue
            if global_batch % dp:
                continue
            yield tp, pp, dp


def _schedules_for(pp: int, space: SearchSpace) -> tuple[str, ...]:
    if pp == 1:
        return ("1f1b",)
    return space.schedules or SYNC_DEFAULT


def _virtuals_for(schedule: str, pp: int, m: int, layers: int, space: SearchSpace) -> list[int]:
    info = schedules.get_schedule(schedule)
    if space.virtual_stages:
        options = list(space.virtual_stages)
    elif info.chunks_per_device is not None:
        options = [info.chunks_per_device]
    else:
        options = [2, 4] if schedule == "interleaved-1f1b" else [1]
    out = []
    for v in options:
        if pp * v > layers:
            continue
        try:
            info.validate(pp, m, v)
        except ValueError:
            continue
        out.append(v)
    return out


def partition_for(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, table: LayerTable,
                  c: CostConstants, *, balanced: bool = True) -> Partition:
    """Stage boundaries for ``cfg``: exact min-max DP under memory (v = 1), time-only for v > 1."""
    p, v = cfg.pp, cfg.virtual_stages
    n = graph.num_layers
    if not balanced:
        return Partition(uniform_partition(n, p * v), math.nan, "given")
    if v == 1:
        flights = list(flights_of(cfg.schedule, p, cfg.num_micro_batches, 1))
        vec = stage_memory_vec(table, cfg, c, p=p, in_flight=flights)
        costs = StageCosts(time=table.total_s, memory=lambda i, j, k: float(vec(j, k)[i]),
                           limit=usable_memory_bytes(cluster, c), memory_vec=vec,
                           memory_matrix=stage_memory_matrix(table, cfg, c, p=p, in_flight=flights))
        return partition_dp(costs, p)
    return partition_unconstrained(table.total_s, p * v)  # memory is checked per device by evaluate


@functools.lru_cache(maxsize=65536)
def flights_of(schedule: str, p: int, m: int, v: int) -> tuple[float, ...]:
    """Micro-batches in flight on each pipeline position (memoised: the search asks often)."""
    return tuple(schedules.in_flight(schedule, p=p, m=m, v=v, device=k) for k in range(p))


def _memory_lower_bound(table: LayerTable, cfg: ParallelConfig, c: CostConstants) -> dict[str, float]:
    """No device of the configuration can need less than this.

    The devices of one replica together hold every layer; each device's memory is a sum of
    non-negative terms (model state, in-flight activations, maxima of buffers), so the busiest
    holds at least the whole model's memory at the smallest in-flight count divided by pp.
    """
    n = len(table.params)
    p, v = cfg.pp, cfg.virtual_stages
    flight = min(flights_of(cfg.schedule, p, cfg.num_micro_batches, v))
    parts = stage_memory(table, [(0, n)], in_flight=flight, cfg=cfg, c=c, is_last=False).as_dict()
    return {part: nbytes / p for part, nbytes in parts.items()}


def _busiest_device_s(table: LayerTable, boundaries: tuple[tuple[int, int], ...], cfg: ParallelConfig) -> float:
    """Per-micro-batch work of the busiest device: every device runs all m micro-batches of it."""
    prefix = np.concatenate([[0.0], np.cumsum(table.total_s)])
    devices = schedules.chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
    work = [0.0] * cfg.pp
    for j, (a, b) in enumerate(boundaries):
        work[devices[j]] += float(prefix[b] - prefix[a])
    return max(work)


class _PartitionCache:
    """Partitions shared by configurations that differ only in what does not change them.

    The time-only optimum of a (table, stage count) is computed once; when it fits at every
    position it is also the memory-constrained optimum, else the constrained DP runs (cached by
    the memory-relevant knobs: schedule in-flight counts, ZeRO stage, dp).
    """

    def __init__(self) -> None:
        self.free: dict[tuple, Partition] = {}
        self.bound: dict[tuple, Partition] = {}

    def get(self, graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, table: LayerTable,
            c: CostConstants, balanced: bool, cutoff_s: float = math.inf) -> Partition:
        """The partition, or status "pruned" when even the time-only optimum cannot beat
        ``cutoff_s`` (the memory-constrained bottleneck is never below the unconstrained one)."""
        if not balanced:
            return partition_for(graph, cluster, cfg, table, c, balanced=False)
        if cfg.virtual_stages > 1:  # time-only split into p·v chunks, shared by every v > 1 schedule
            key = (id(table), cfg.pp * cfg.virtual_stages)
            if key not in self.free:
                self.free[key] = partition_for(graph, cluster, cfg, table, c)
            return self.free[key]
        p = cfg.pp
        free_key = (id(table), p)
        if free_key not in self.free:
            self.free[free_key] = partition_unconstrained(table.total_s, p)
        free = self.free[free_key]
        flights = flights_of(cfg.schedule, p, cfg.num_micro_batches, 1)
        limit = usable_memory_bytes(cluster, c)
        if free.feasible and all(
                stage_memory(table, [seg], in_flight=flights[k], cfg=cfg, c=c, is_last=(k == p - 1)).total <= limit
                for k, seg in enumerate(free.boundaries)):
            return free
        if free.feasible and cfg.num_micro_batches * free.bottleneck_s >= cutoff_s:
            return Partition((), free.bottleneck_s, "pruned")
        key = (id(table), p, flights, cfg.zero_stage, cfg.dp)
        if key not in self.bound:
            self.bound[key] = partition_for(graph, cluster, cfg, table, c)
        return self.bound[key]


def search(graph: CostGraph, cluster: ClusterSpec, global_batch: int, *, space: SearchSpace | None = None,
           constants: CostConstants | None = None, time_limit_s: float | None = None, top_k: int = 5,
           progress: Callable[[int, int], None] | None = None,
           table_cache: dict[tuple, LayerTable] | None = None) -> SearchResult:
    """Best configuration under the cost model; ``top`` holds the ``top_k`` best, sorted.

    ``table_cache`` lets several searches on the same graph, cluster and constants (the plan and
    its baselines) share layer tables.
    """
    space = space or SearchSpace()
    c = constants or CostConstants()
    start = time.perf_counter()
    top: list[Candidate] = []
    misses: list[Candidate] = []
    evaluated = pruned = infeasible = 0
    tables: dict[tuple, LayerTable] = table_cache if table_cache is not None else {}
    degrees = list(candidate_degrees(graph, cluster, global_batch, space))
    timed_out = False

    def kth_best() -> float:
        return top[-1].step_time_s if len(top) >= top_k else math.inf

    # Best-first: price every (tp, pp, dp, micro-batch, sp, recompute) family's lower bound,
    # visit families in bound order, stop when the next bound cannot beat the k-th best plan.
    families: list[tuple[float, tuple]] = []
    for tp, pp, dp in degrees:
        per_replica = global_batch // dp
        mbs = [b for b in _divisors(per_replica) if b <= space.max_micro_batch_size]
        if space.micro_batch_size:
            mbs = [b for b in mbs if b in space.micro_batch_size]
        for mb in mbs:
            m = per_replica // mb
            for sp in space.sequence_parallel:
                if sp and tp == 1:
                    continue
                for rec in space.recompute:
                    key = (tp, mb, sp, rec)
                    if key not in tables:
                        tables[key] = layer_table(graph, cluster, micro_batch=mb, tp=tp, sequence_parallel=sp,
                                                  recompute=rec, c=c)
                    tot = tables[key].total_s
                    bound = m * max(float(tot.sum()) / pp, float(tot.max()))
                    families.append((bound, (pp, tp, dp, mb, RECOMPUTE.index(rec), sp)))
    families.sort()
    unvisited_bound = math.inf
    bound_misses: list[tuple[dict[str, float], ParallelConfig]] = []
    limit = usable_memory_bytes(cluster, c)
    partition_cache = _PartitionCache()
    for done, (bound, (pp, tp, dp, mb, rec_i, sp)) in enumerate(families):
        if progress and done % 16 == 0:
            progress(done, len(families))
        if bound >= kth_best():
            pruned += len(families) - done
            break
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s and top:
            timed_out = True
            unvisited_bound = bound
            break
        rec = RECOMPUTE[rec_i]
        m = global_batch // dp // mb
        table = tables[(tp, mb, sp, rec)]
        for sched in _schedules_for(pp, space):
            for v in _virtuals_for(sched, pp, m, graph.num_layers, space):
                for zero in [z for z in space.zero_stage if pp == 1 or z <= 1]:
                    if zero and dp == 1:
                        continue
                    cfg = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mb, num_micro_batches=m,
                                         virtual_stages=v, schedule=sched, recompute=rec, sequence_parallel=sp,
                                         zero_stage=zero, overlap_grad_reduce=space.overlap_grad_reduce)
                    evaluated += 1
                    need = _memory_lower_bound(table, cfg, c)
                    if need["total"] > limit:
                        infeasible += 1
                        bound_misses.append((need, cfg))
                        bound_misses.sort(key=lambda x: x[0]["total"])
                        del bound_misses[3:]
                        continue
                    part = partition_cache.get(graph, cluster, cfg, table, c, space.partition == "balanced",
                                               cutoff_s=kth_best())
                    if part.status == "pruned":
                        pruned += 1
                        continue
                    if not part.feasible and part.status != "given":
                        infeasible += 1
                        continue
                    if part.feasible and m * _busiest_device_s(table, part.boundaries, cfg) >= kth_best():
                        pruned += 1
                        continue
                    pred = evaluate(graph, cluster, cfg, list(part.boundaries), c, table=table)
                    cand = Candidate(cfg, part.boundaries, pred, part.status)
                    if not pred.fits:
                        infeasible += 1
                        misses.append(cand)
                        misses.sort(key=lambda x: x.prediction.peak_memory_bytes)
                        del misses[3:]
                        continue
                    if pred.step_time_s < kth_best():
                        top.append(cand)
                        top.sort(key=_rank_key)
                        del top[top_k:]
    if progress:
        progress(len(families), len(families))
    best_s = top[0].step_time_s if top else math.inf
    return SearchResult(best=top[0] if top else None, top=top, evaluated=evaluated, pruned=pruned,
                        infeasible=infeasible, time_s=time.perf_counter() - start, timed_out=timed_out,
                        closest_misses=misses, lower_bound_s=min(best_s, unvisited_bound),
                        memory_bound_misses=bound_misses)


def _rank_key(cand: Candidate) -> tuple:
    """Faster first; ties broken by less memory, then by the simpler configuration (deterministic)."""
    cfg = cand.config
    return (round(cand.step_time_s, 12), round(cand.prediction.peak_memory_bytes), cfg.pp, cfg.tp,
            cfg.virtual_stages, cfg.zero_stage, RECOMPUTE.index(cfg.recompute), cfg.sequence_parallel,
            cfg.schedule, cfg.micro_batch_size)
