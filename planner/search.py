"""Joint search over parallel configurations: degrees, micro-batching, schedule, memory savers.

For every configuration the stage boundaries come from the exact stage solver
(:mod:`planner.inter_op.chain`), and the prediction from the cost model. Configurations are
enumerated in a fixed order (deterministic), and a configuration is skipped only when a *lower
bound* on its step time is already worse than the k-th best plan found: every device of a
synchronous pipeline must run all ``m`` micro-batches of its layers, so
``step ≥ m · Σ_layers t(layer) / pp`` (busiest device at least the average). The bound never
exceeds the true prediction, so pruning never discards the optimum (docs/search.md).

Every table, tp solve, partition and prediction comes from one :class:`planner.pricing.Pricer`
(tensor-parallel communication priced by the intra-op ILP, one solve per (tp, micro-batch, sp));
bounds and memory screens use the tables without it (same memory, lower times), so the ILP runs only
for configurations that survive them. The result carries what the plan needs besides the best
configuration (the other schedules at its degrees, its tp solve), so building the plan prices
nothing again.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace

from planner import schedules
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import NO_KNOBS, LayerTable, StepPrediction, TableKnobs
from planner.inter_op.chain import Partition
from planner.intra_op.pricing import TpPricing
from planner.plan import RECOMPUTE, ParallelConfig
from planner.pricing import Pricer, flights_of, table_key
from planner.space import (  # noqa: F401  (SYNC_DEFAULT, SearchSpace: planner.search's public names)
    SYNC_DEFAULT,
    SearchSpace,
    candidate_degrees,
    candidate_meshes,
    check_sequence_parallel,
    divisors,
    ep_options,
    fp8_options,
    recompute_every_options,
    reshard_options,
    schedules_for,
    shard_options,
    unrunnable_combination,
    virtuals_for,
)
from planner.trace.graph import CostGraph

# Configurations the search keeps beyond its ``top_k`` for local search on their splits to reorder.
_POLISH_POOL = 3


@dataclass
class Candidate:
    config: ParallelConfig
    boundaries: tuple[tuple[int, int], ...]
    prediction: StepPrediction
    partition_status: str = "optimal"
    # The solver's split as local search on the simulated step improved it (planner.inter_op.local_search):
    # share of the step it saved (0: the solver's split stayed) and the steps it priced.
    split_gain: float = 0.0
    split_evaluations: int = 0

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
    # For the plan (search(..., explain=True)): the other synchronous schedules at the best's degrees
    # and micro-batching, and the intra-op ILP solve its tp group was priced with (None: tp = 1).
    schedule_options: list[ScheduleOption] = field(default_factory=list)
    tp_solve: TpPricing | None = None


@dataclass(frozen=True)
class ScheduleOption:
    """One synchronous schedule at a configuration's degrees and micro-batching, as the search priced it."""

    schedule: str
    virtual_stages: int
    step_time_s: float | None  # None: no stage split fits in memory
    bubble_fraction: float = math.nan
    fits: bool = False


def search(graph: CostGraph, cluster: ClusterSpec, global_batch: int, *, space: SearchSpace | None = None,
           constants: CostConstants | None = None, time_limit_s: float | None = None, top_k: int = 5,
           progress: Callable[[int, int], None] | None = None, pricer: Pricer | None = None,
           explain: bool = False) -> SearchResult:
    """Best configuration under the cost model; ``top`` holds the ``top_k`` best, sorted.

    ``pricer`` (of the same graph and cluster; its constants win) lets several searches (the plan
    and its baselines) share tables, tp solves and partitions. With ``explain``, the result also
    holds what the plan reports about the best (``schedule_options``, ``tp_solve``).
    """
    space = space or SearchSpace()
    check_sequence_parallel(graph, space.sequence_parallel)
    pricer = pricer or Pricer(graph, cluster, constants)
    assert pricer.graph is graph and pricer.cluster is cluster, "the pricer prices another graph or cluster"
    start = time.perf_counter()
    run = _Search(pricer, space, top_k)
    families = _families(pricer, global_batch, space)
    unvisited_bound = math.inf
    timed_out = False
    for done, (bound, (pp, tp, dp, mb, rec_i, sp, knobs)) in enumerate(families):
        if progress and done % 16 == 0:
            progress(done, len(families))
        if bound >= run.kth_best():
            run.pruned += len(families) - done
            break
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s and run.top:
            timed_out = True
            unvisited_bound = bound
            break
        run.family(pp, tp, dp, mb, RECOMPUTE[rec_i], sp, global_batch // dp // mb, knobs)
    if progress:
        progress(len(families), len(families))
    top = run.polished_top()
    best = top[0] if top else None
    return SearchResult(best=best, top=top, evaluated=run.evaluated, pruned=run.pruned, infeasible=run.infeasible,
                        time_s=time.perf_counter() - start, timed_out=timed_out, closest_misses=run.misses,
                        lower_bound_s=min(best.step_time_s if best else math.inf, unvisited_bound),
                        memory_bound_misses=run.bound_misses,
                        schedule_options=compare_schedules(pricer, best) if explain and best else [],
                        tp_solve=tp_solve_of(pricer, best.config) if explain and best else None)


def _families(pricer: Pricer, global_batch: int, space: SearchSpace) -> list[tuple[float, tuple]]:
    """Every (tp, cp, pp, dp, micro-batch, sp, recompute, table knobs) family with a lower bound on its
    step time, in bound order: the search visits them best-first and stops when the next cannot beat
    the k-th best."""
    graph = pricer.graph
    families: list[tuple[float, tuple]] = []
    fp8s = fp8_options(pricer.cluster, space)
    for tp, cp, pp, dp in candidate_meshes(graph, pricer.cluster, global_batch, space):
        per_replica = global_batch // dp
        mbs = [b for b in divisors(per_replica) if b <= space.max_micro_batch_size]
        if space.micro_batch_size:
            mbs = [b for b in mbs if b in space.micro_batch_size]
        for mb in mbs:
            m = per_replica // mb
            for sp in space.sequence_parallel:
                if sp and (tp == 1 or not graph.seq_len):
                    continue
                for rec in space.recompute:
                    for knobs in _family_knobs(graph, cp, dp, rec, fp8s, space):
                        if knobs.ep > 1 and space.runtime_combinations and unrunnable_combination(ParallelConfig(
                                dp=dp, tp=tp, pp=pp, cp=cp, ep=knobs.ep, sequence_parallel=sp)):
                            continue  # no ZeRO stage makes this family runnable: not worth its bound
                        bound = m * pricer.work_bound_s((tp, mb, sp, rec, knobs), pp, dp * cp, priced=False)
                        families.append((bound, (pp, tp, dp, mb, RECOMPUTE.index(rec), sp, knobs)))
    families.sort(key=lambda f: (f[0], f[1][:6], astuple(f[1][6])))
    return families


def _family_knobs(graph: CostGraph, cp: int, dp: int, rec: str, fp8s: tuple[bool, ...],
                  space: SearchSpace) -> list[TableKnobs]:
    """The table knobs of one (cp, dp, recompute): expert-parallel degree, FP8, recompute interval."""
    return [TableKnobs(cp=cp, ep=ep, fp8=fp8, recompute_every=k) for ep in ep_options(graph, dp, space)
            for fp8 in fp8s for k in recompute_every_options(rec, space)]


class _Search:
    """The state of one best-first search: the k best, the closest misses and the counters."""

    def __init__(self, pricer: Pricer, space: SearchSpace, top_k: int) -> None:
        self.pricer, self.space, self.top_k = pricer, space, top_k
        self.top: list[Candidate] = []
        self.misses: list[Candidate] = []
        self.bound_misses: list[tuple[dict[str, float], ParallelConfig]] = []
        self.evaluated = self.pruned = self.infeasible = 0
        self.limit = pricer.largest_usable_bytes()
        self.rule = space.partition  # "balanced"/"exact": the solver's split; else a fixed rule (Pricer.rule_split)
        # ``top`` keeps a few more than ``top_k``: local search on their splits can reorder them
        self.polish = self.rule == "balanced"
        self.pool = top_k + _POLISH_POOL if self.polish else top_k

    def kth_best(self) -> float:
        return self.top[self.top_k - 1].step_time_s if len(self.top) >= self.top_k else math.inf

    def polished_top(self) -> list[Candidate]:
        """The ``top_k`` best once each kept pipeline's split is improved on the simulated step
        (:func:`polished`). Pruning stays sound: its bounds hold for every split of a configuration."""
        if not self.polish:
            return self.top
        return sorted((polished(self.pricer, c) for c in self.top), key=_rank_key)[:self.top_k]

    def family(self, pp: int, tp: int, dp: int, mb: int, rec: str, sp: bool, m: int,
               knobs: TableKnobs = NO_KNOBS) -> None:
        """Every schedule, virtual-stage count, ZeRO stage and HSDP grouping of one family."""
        space, graph = self.space, self.pricer.graph
        # memory and the cheap time bounds need no tp pricing; the ILP runs only for survivors
        cheap = self.pricer.bound_table((tp, mb, sp, rec, knobs))
        # Within a family the memory bound varies only with the smallest in-flight count and the
        # ZeRO stage (table, tp, pp, dp and sp are the family's), so each is computed once.
        family_memory: dict[tuple[float, int], dict[str, float]] = {}
        sharding = self._sharding(pp, dp, tp * knobs.cp)  # the same for every schedule of the family
        for sched in schedules_for(pp, space):
            for v in virtuals_for(sched, pp, m, graph.num_layers, space):
                lower_screened = False  # a ZeRO-0/1 variant passed the memory screen
                for zero, shard, reshard in sharding:
                    if zero and (shard or dp) % knobs.ep:  # ZeRO shards experts over dp_shard/ep (cost/experts.py)
                        continue
                    if zero == 3 and pp > 1 and lower_screened:  # FSDP under a pipeline: tried for memory
                        continue
                    cfg = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mb, num_micro_batches=m,
                                         virtual_stages=v, schedule=sched, recompute=rec, sequence_parallel=sp,
                                         zero_stage=zero, overlap_grad_reduce=space.overlap_grad_reduce,
                                         cp=knobs.cp, ep=knobs.ep, fp8=knobs.fp8, recompute_every=knobs.recompute_every,
                                         dp_shard=shard, reshard_after_forward=reshard)
                    if space.runtime_combinations and unrunnable_combination(cfg):
                        continue
                    self.evaluated += 1
                    memory_key = (min(flights_of(sched, pp, m, v)), zero, shard, reshard)
                    if memory_key not in family_memory:
                        family_memory[memory_key] = self.pricer.memory_lower_bound(cheap, cfg)
                    need = family_memory[memory_key]
                    if need["total"] > self.limit:
                        self.infeasible += 1
                        self.bound_misses.append((dict(need), cfg))
                        self.bound_misses.sort(key=lambda x: x[0]["total"])
                        del self.bound_misses[3:]
                        continue
                    lower_screened = lower_screened or zero < 3
                    self.config(cfg, cheap)

    def _sharding(self, pp: int, dp: int, dp_stride: int = 1) -> list[tuple[int, int | None, bool]]:
        """(ZeRO stage, HSDP shard group, reshard after forward) choices of a (pp, dp) family (``dp_stride``:
        tp·cp, the rank distance between dp replicas)."""
        out = []
        for zero in self.space.zero_stage:
            if zero and dp == 1 or (pp > 1 and zero == 2):
                continue
            reshards = reshard_options(zero, self.space)
            if pp > 1 and zero == 3 and self.space.reshard_after_forward is None:
                reshards = (False,)  # FSDP under a pipeline keeps its gathered weights (torchtitan, Llama 3)
            out += [(zero, shard, r) for shard in shard_options(dp, zero, self.pricer.cluster, self.space,
                                                                  dp_stride=dp_stride)
                    for r in reshards]
        return out

    def _split(self, cfg: ParallelConfig, table: LayerTable) -> Partition | None:
        """The configuration's partition, or None when it is pruned or nothing fits (counted)."""
        part = self.pricer.partition(cfg, table, cutoff_s=self.kth_best(), rule=self.rule)
        if part.status == "pruned":
            self.pruned += 1
            return None
        if not part.feasible and part.status != "given":
            self.infeasible += 1
            return None
        return part

    def config(self, cfg: ParallelConfig, cheap: LayerTable) -> None:
        """Bound, split and price one configuration that passed the memory screen; keep it if good."""
        pricer, m, key = self.pricer, cfg.num_micro_batches, table_key(cfg)
        if cfg.tp > 1 and not pricer.is_priced(key):
            # Until this family's tp group is priced, screen on the tables without tp communication
            # (same memory, lower times): no split that fits there fits anywhere, and the busiest
            # device runs at least the slowest chunk of the best split there (its min-max
            # bottleneck). Once priced, the priced partition below does the same, tighter.
            part = self._split(cfg, cheap)
            if part is None:
                return
            if part.feasible and m * part.bottleneck_bound_s >= self.kth_best():
                self.pruned += 1
                return
        table = pricer.table(key)
        if m * pricer.work_bound_s(key, cfg.pp, cfg.dp * cfg.cp, priced=True) >= self.kth_best():
            self.pruned += 1  # the family's bound with tp priced
            return
        part = self._split(cfg, table)
        if part is None:
            return
        if part.feasible and m * pricer.busiest_s(cfg, part.boundaries) >= self.kth_best():
            self.pruned += 1
            return
        self._keep(Candidate(cfg, part.boundaries, pricer.evaluate(cfg, part.boundaries, table), part.status))

    def _keep(self, cand: Candidate) -> None:
        if not cand.prediction.fits:
            self.infeasible += 1
            self.misses.append(cand)
            self.misses.sort(key=lambda x: x.prediction.peak_memory_bytes)
            del self.misses[3:]
            return
        if len(self.top) < self.pool or cand.step_time_s < self.top[-1].step_time_s:
            self.top.append(cand)
            self.top.sort(key=_rank_key)
            del self.top[self.pool:]


def polished(pricer: Pricer, cand: Candidate) -> Candidate:
    """``cand`` at the split local search on the simulated step reaches from the solver's
    (:meth:`planner.pricing.Pricer.polish`); unchanged with one stage or a split it did not solve."""
    if cand.config.pp * cand.config.virtual_stages < 2 or cand.partition_status != "optimal":
        return cand
    found, pred = pricer.polish(cand.config, cand.boundaries, start=cand.prediction)
    if found.evaluations == 0:  # too little bubble to search (Pricer.polish)
        return cand
    if found.boundaries == cand.boundaries:
        return replace(cand, split_evaluations=found.evaluations)
    return replace(cand, boundaries=found.boundaries, prediction=pred, split_gain=found.gain,
                   split_evaluations=found.evaluations)


def compare_schedules(pricer: Pricer, cand: Candidate) -> list[ScheduleOption]:
    """The synchronous schedules at ``cand``'s degrees and micro-batching (pp > 1; its own included),
    each with its own stage split (the exact solver's, improved by local search as :func:`polished`
    does) and prediction."""
    cfg = cand.config
    if cfg.pp == 1:
        return []
    table = pricer.table(table_key(cfg))
    out = []
    for name in SYNC_DEFAULT:
        info = schedules.get_schedule(name)
        v = info.chunks_per_device or (cfg.virtual_stages if name == cfg.schedule else 2 if name ==
                                        "interleaved-1f1b" else 1)
        try:
            info.validate(cfg.pp, cfg.num_micro_batches, v)
        except ValueError:
            continue
        if schedules.search_skips(name, cfg.pp, cfg.num_micro_batches, v):
            continue
        if cfg.pp * v > pricer.graph.num_layers:
            continue
        alt = replace(cfg, schedule=name, virtual_stages=v)
        part = pricer.split(alt, table)
        if not part.feasible:
            out.append(ScheduleOption(name, v, None))
            continue
        pred = pricer.polish(alt, part.boundaries, table)[1]  # as the search prices its best
        out.append(ScheduleOption(name, v, pred.step_time_s,
                                  getattr(pred.schedule_result, "bubble_fraction", math.nan), pred.fits))
    return out


def tp_solve_of(pricer: Pricer, cfg: ParallelConfig) -> TpPricing | None:
    """The intra-op ILP solve ``cfg``'s tp group was priced with (None when tp = 1)."""
    return pricer.tp_solve(cfg.tp, cfg.micro_batch_size, cfg.sequence_parallel) if cfg.tp > 1 else None


def _rank_key(cand: Candidate) -> tuple:
    """Faster first; ties broken by less memory, then by the simpler configuration (deterministic)."""
    cfg = cand.config
    return (round(cand.step_time_s, 12), round(cand.prediction.peak_memory_bytes), cfg.pp, cfg.tp,
            cfg.virtual_stages, cfg.zero_stage, RECOMPUTE.index(cfg.recompute), cfg.sequence_parallel,
            cfg.schedule, cfg.micro_batch_size)
