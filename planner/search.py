"""Joint search over parallel configurations: degrees, micro-batching, schedule, memory savers.

For every configuration the stage boundaries come from the exact partition DP
(:mod:`planner.inter_op.chain`), and the prediction from the cost model. Configurations are
enumerated in a fixed order (deterministic), and a configuration is skipped only when a *lower
bound* on its step time is already worse than the k-th best plan found: every device of a
synchronous pipeline must run all ``m`` micro-batches of its layers, so
``step ≥ m · Σ_layers t(layer) / pp`` (busiest device at least the average). The bound never
exceeds the true prediction, so pruning never discards the optimum (docs/search.md).

Tensor-parallel communication is priced by the intra-op ILP (``layer_table``'s default, one
cached solve per (tp, micro-batch, sp)); bounds and memory screens use the table without it
(``tp_pricing="none"``: same memory, lower times), so the ILP runs only for configurations that
survive them.
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
    group_layer_tables,
    layer_table,
    stage_memory,
    stage_memory_matrix,
    stage_memory_vec,
    usable_memory_bytes,
)
from planner.errors import SpecError
from planner.inter_op.chain import Partition, StageCosts, partition_dp, uniform_partition
from planner.inter_op.hetero import hetero_partition
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
    """Stage boundaries for ``cfg``: exact min-max DP under memory (v = 1), time-only for v > 1.

    On a mixed cluster the exact stage DP of :mod:`planner.inter_op` splits the layers with each
    pipeline position's own device speed and memory, when it models ``cfg``
    (:func:`planner.inter_op.hetero.hetero_partition`).
    """
    p, v = cfg.pp, cfg.virtual_stages
    n = graph.num_layers
    if not balanced:
        return Partition(uniform_partition(n, p * v), math.nan, "given")
    if not cluster.is_homogeneous:  # each position on its own device type (planner/inter_op/hetero.py)
        part = hetero_partition(graph, cluster, cfg, c)
        if part is not None:
            return part
        # Not modelled by the stage DP (a position straddling device types, v > 1, ...): the
        # single-device split below, which evaluate then prices per device type.
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
    prefix = table.total_prefix_s()
    devices = schedules.chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
    work = [0.0] * cfg.pp
    for j, (a, b) in enumerate(boundaries):
        work[devices[j]] += float(prefix[b] - prefix[a])
    return max(work)


def _position_tables(graph: CostGraph, cluster: ClusterSpec, key: tuple, pp: int, dp: int, c: CostConstants,
                     tp_pricing: str = "ilp") -> list[LayerTable]:
    """The layer table each pipeline position of a mixed cluster is priced with (its device type;
    a position straddling types at its slowest member, as :func:`planner.cost.model.evaluate`)."""
    tp, mb, sp, rec = key
    per_group = group_layer_tables(graph, cluster, micro_batch=mb, tp=tp, sequence_parallel=sp, recompute=rec, c=c,
                                   tp_pricing=tp_pricing)
    return [per_group[cluster.slowest_group(span)] for span in cluster.position_groups(pp, dp * tp)]


def _mixed_work_bound_s(graph: CostGraph, cluster: ClusterSpec, key: tuple, pp: int, dp: int, c: CostConstants,
                        tp_pricing: str = "ilp") -> float:
    """A lower bound on the busiest position's work per micro-batch on a mixed cluster.

    Position ``k`` runs its layers at its own speed, ``w_k = Σ_{l∈k} t_k(l) ≤ T``. For any weights
    ``μ_k ≥ 0``, ``T·Σ_k μ_k ≥ Σ_k μ_k w_k ≥ Σ_l min_k μ_k t_k(l)`` (weak duality of the fractional
    split). Two choices are taken: ``μ = 1`` (every layer at its fastest) and ``μ_k = 1 / Σ_l t_k(l)``
    (positions weighted by speed: tight when the device types differ by one factor). A single
    layer also runs whole on some position: ``T ≥ max_l min_k t_k(l)``. ``tp_pricing="none"``
    leaves out tensor-parallel communication (non-negative seconds): still a lower bound, cheaper.
    """
    times = np.array([t.total_s for t in _position_tables(graph, cluster, key, pp, dp, c, tp_pricing)])
    fastest = times.min(axis=0)  # [layer], over positions
    best = max(float(fastest.sum()) / pp, float(fastest.max()))
    mu = 1.0 / np.maximum(times.sum(axis=1), 1e-300)
    return max(best, float((times * mu[:, None]).min(axis=0).sum() / mu.sum()))


def _busiest_position_s(graph: CostGraph, cluster: ClusterSpec, boundaries: tuple[tuple[int, int], ...],
                        cfg: ParallelConfig, c: CostConstants) -> float:
    """:func:`_busiest_device_s` on a mixed cluster: each position's chunks at its own speed."""
    key = (cfg.tp, cfg.micro_batch_size, cfg.sequence_parallel, cfg.recompute)
    tables = _position_tables(graph, cluster, key, cfg.pp, cfg.dp, c)
    devices = schedules.chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
    work = [0.0] * cfg.pp
    for j, (a, b) in enumerate(boundaries):
        work[devices[j]] += float(tables[devices[j]].total_s[a:b].sum())
    return max(work)


def _largest_usable_bytes(cluster: ClusterSpec, c: CostConstants) -> float:
    """The most memory any device may use (the memory lower bound is for the busiest device, which
    on a mixed cluster may be the one with the most memory)."""
    if cluster.is_homogeneous:
        return usable_memory_bytes(cluster, c)
    return max(usable_memory_bytes(cluster.group_view(g), c) for g in range(len(cluster.groups)))


def priced_table(tables: dict[tuple, LayerTable], graph: CostGraph, cluster: ClusterSpec, key: tuple,
                  c: CostConstants) -> LayerTable:
    """The layer table of ``key`` = (tp, mb, sp, recompute), tp communication priced by the intra-op
    ILP (:func:`planner.cost.model.layer_table`); built on first use and kept in ``tables``."""
    if key not in tables:
        tp, mb, sp, rec = key
        tables[key] = layer_table(graph, cluster, micro_batch=mb, tp=tp, sequence_parallel=sp, recompute=rec, c=c)
    return tables[key]


def _bound_table(tables: dict[tuple, LayerTable], graph: CostGraph, cluster: ClusterSpec, key: tuple,
                 c: CostConstants) -> LayerTable:
    """``key``'s layer table without tensor-parallel communication (``tp_pricing="none"``).

    Every array but ``tp_comm_s`` (and full recomputation's repeat of the forward collectives) is
    the priced table's, and those only add non-negative seconds, so its times are lower bounds and
    its memory is exact: the search bounds and memory-screens every family with it and runs the
    ILP only for configurations that survive (most families of a large cluster never need it).
    """
    if key[0] == 1:  # no tp communication to leave out
        return priced_table(tables, graph, cluster, key, c)
    bound_key = ("no-tp-comm", *key)
    if bound_key not in tables:
        tp, mb, sp, rec = key
        tables[bound_key] = layer_table(graph, cluster, micro_batch=mb, tp=tp, sequence_parallel=sp, recompute=rec,
                                        c=c, tp_pricing="none")
    return tables[bound_key]


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
        if not cluster.is_homogeneous:  # per-device-type split: every knob but sp/recompute/tp/mb changes it
            key = ("hetero", id(table), cfg.pp, cfg.dp, cfg.virtual_stages, cfg.schedule, cfg.num_micro_batches,
                   cfg.zero_stage)
            if key not in self.bound:
                self.bound[key] = partition_for(graph, cluster, cfg, table, c)
            return self.bound[key]
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


def check_sequence_parallel(graph: CostGraph, allowed: Iterable[bool]) -> None:
    """Sequence parallelism splits activations along the sequence; a model without one (an MLP, a
    CNN: ``seq_len`` is None) cannot use it, so asking for it alone is an error, not an empty search."""
    if not graph.seq_len and False not in tuple(allowed):
        raise SpecError("sequence_parallel", True, f"model {graph.name!r} has no sequence dimension (seq_len is "
                        "None), so there is nothing to split along it; drop --sequence-parallel")


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
    check_sequence_parallel(graph, space.sequence_parallel)
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
                if sp and (tp == 1 or not graph.seq_len):
                    continue
                for rec in space.recompute:
                    key = (tp, mb, sp, rec)
                    if cluster.is_homogeneous:
                        total_sum, total_max = _bound_table(tables, graph, cluster, key, c).total_summary_s()
                        bound = m * max(total_sum / pp, total_max)
                    else:
                        bound = m * _mixed_work_bound_s(graph, cluster, key, pp, dp, c, tp_pricing="none")
                    families.append((bound, (pp, tp, dp, mb, RECOMPUTE.index(rec), sp)))
    families.sort()
    unvisited_bound = math.inf
    bound_misses: list[tuple[dict[str, float], ParallelConfig]] = []
    limit = _largest_usable_bytes(cluster, c)
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
        key = (tp, mb, sp, rec)
        # memory and the cheap time bounds need no tp pricing; the ILP runs only for survivors
        cheap = _bound_table(tables, graph, cluster, key, c)
        # Within a family the memory bound varies only with the smallest in-flight count and the
        # ZeRO stage (table, tp, pp, dp and sp are the family's), so each is computed once.
        family_memory: dict[tuple[float, int], dict[str, float]] = {}
        for sched in _schedules_for(pp, space):
            for v in _virtuals_for(sched, pp, m, graph.num_layers, space):
                for zero in [z for z in space.zero_stage if pp == 1 or z <= 1]:
                    if zero and dp == 1:
                        continue
                    cfg = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mb, num_micro_batches=m,
                                         virtual_stages=v, schedule=sched, recompute=rec, sequence_parallel=sp,
                                         zero_stage=zero, overlap_grad_reduce=space.overlap_grad_reduce)
                    evaluated += 1
                    memory_key = (min(flights_of(sched, pp, m, v)), zero)
                    if memory_key not in family_memory:
                        family_memory[memory_key] = _memory_lower_bound(cheap, cfg, c)
                    need = family_memory[memory_key]
                    if need["total"] > limit:
                        infeasible += 1
                        bound_misses.append((dict(need), cfg))
                        bound_misses.sort(key=lambda x: x[0]["total"])
                        del bound_misses[3:]
                        continue
                    if cluster.is_homogeneous and tp > 1 and key not in tables:
                        # Until this family's tp group is priced, screen on the table without tp
                        # communication (same memory, lower times): no split that fits there fits
                        # anywhere, and the busiest device runs at least the slowest chunk of the
                        # best split there (its min-max bottleneck). Once priced, the priced
                        # partition below does the same, tighter.
                        part = partition_cache.get(graph, cluster, cfg, cheap, c, space.partition == "balanced",
                                                   cutoff_s=kth_best())
                        if part.status == "pruned" or (part.feasible and m * part.bottleneck_s >= kth_best()):
                            pruned += 1
                            continue
                        if not part.feasible and part.status != "given":
                            infeasible += 1
                            continue
                    table = priced_table(tables, graph, cluster, key, c)
                    total_sum, total_max = table.total_summary_s()
                    if m * (max(total_sum / pp, total_max) if cluster.is_homogeneous else
                            _mixed_work_bound_s(graph, cluster, key, pp, dp, c)) >= kth_best():
                        pruned += 1  # the family's bound with tp priced
                        continue
                    part = partition_cache.get(graph, cluster, cfg, table, c, space.partition == "balanced",
                                               cutoff_s=kth_best())
                    if part.status == "pruned":
                        pruned += 1
                        continue
                    if not part.feasible and part.status != "given":
                        infeasible += 1
                        continue
                    if part.feasible and m * (_busiest_device_s(table, part.boundaries, cfg) if cluster.is_homogeneous
                                              else _busiest_position_s(graph, cluster, part.boundaries, cfg,
                                                                       c)) >= kth_best():
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
