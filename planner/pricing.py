"""The pricing context: one graph on one cluster under one set of constants, priced once.

:class:`Pricer` owns every cache the search, the plan and the validation share: the layer tables
of each ``(tp, micro_batch, sequence_parallel, recompute)`` key (with and without tensor-parallel
communication, on the whole cluster and on each node group), the intra-op ILP's tp solves, and
the stage partitions. It sits above both the cost model (:mod:`planner.cost`, pure arithmetic on
tables) and the solvers (the intra-op ILP prices tp communication, the stage DP splits layers):
it calls the ILP and hands the seconds down to :func:`planner.cost.model.layer_table` as data.

A homogeneous cluster is the one-group case of a mixed one: its one node group's view prices
exactly as the cluster itself, so :meth:`Pricer.group_tables` returns ``[table(key)]`` for it.
Where the one-group case keeps its own formula (the work bound, the busiest device), the method
says why.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import numpy as np

from planner import schedules
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import (
    NO_KNOBS,
    LayerTable,
    StepPrediction,
    TableKnobs,
    evaluate,
    layer_table,
    positions,
    stage_memory,
    stage_memory_matrix,
    usable_memory_bytes,
)
from planner.errors import SpecError
from planner.inter_op.chain import Partition, StageCosts, partition_dp, uniform_partition
from planner.inter_op.device_balance import balance_chunks, busiest_work
from planner.inter_op.framework_splits import FRAMEWORK_SPLITS, SOLVED
from planner.inter_op.local_search import Polished, improve_split
from planner.intra_op.pricing import TpPricing, ilp_layer_table, tp_pricing
from planner.plan import ParallelConfig
from planner.schedules.closed_form import in_flight_per_device
from planner.trace.graph import CostGraph

# (tp, micro_batch, sequence_parallel, recompute, knobs); a 4-tuple means the default knobs.
TableKey = tuple[int, int, bool, str, TableKnobs] | tuple[int, int, bool, str]


def table_key(cfg: ParallelConfig) -> TableKey:
    return (cfg.tp, cfg.micro_batch_size, cfg.sequence_parallel, cfg.recompute, TableKnobs.of(cfg))


def _full_key(key: TableKey) -> tuple[int, int, bool, str, TableKnobs]:
    """``key`` with its knobs (a 4-tuple key, as callers before schema 2.1 write it, has none)."""
    return key if len(key) == 5 else (*key, NO_KNOBS)  # type: ignore[return-value]


@functools.lru_cache(maxsize=65536)
def flights_of(schedule: str, p: int, m: int, v: int) -> tuple[float, ...]:
    """Micro-batches in flight on each pipeline position (memoised: the search asks often)."""
    return tuple(schedules.in_flight(schedule, p=p, m=m, v=v, device=k) for k in range(p))


# The device balance must lower the busiest device's work by this share of (v × the slowest chunk)
# before the balanced split is priced against the min-max one (planner.pricing.Pricer._schedule_choice).
_BALANCE_GAIN = 0.005

# Local search on a split (Pricer.polish) runs where the pipeline bubble is at least this share of
# the step: what it finds are shorter fill, drain and stalls, a share of the bubble (docs/inter-op.md).
_POLISH_MIN_BUBBLE = 0.05
# The split it found replaces the solver's only when it saves at least this share of the step: the
# solver's split also balances memory, and a smaller gain is within what the cost model can tell apart.
_POLISH_MIN_GAIN = 0.005
# Steps it may price: at most _POLISH_EVALS, fewer where each simulates many (micro-batch, chunk)
# pairs (about a microsecond each): _POLISH_WORK pairs in all, but never under _POLISH_MIN_EVALS steps.
_POLISH_EVALS = 200
_POLISH_MIN_EVALS = 20
_POLISH_WORK = 400_000


class Pricer:
    """Layer tables, tp solves, partitions and predictions of ``graph`` on ``cluster`` under ``constants``.

    Everything is built on first use and kept; a search, its baselines and the plan built from it
    share one Pricer, so nothing is priced twice.
    """

    def __init__(self, graph: CostGraph, cluster: ClusterSpec, constants: CostConstants | None = None, *,
                 _solves: dict[tuple, TpPricing] | None = None) -> None:
        self.graph, self.cluster = graph, cluster
        self.c = constants or CostConstants()
        self._tables: dict[tuple, LayerTable] = {}
        self._group_tables: dict[tuple, list[LayerTable]] = {}
        self._solves: dict[tuple, TpPricing] = {} if _solves is None else _solves
        self._free: dict[tuple, Partition] = {}
        self._bound: dict[tuple, Partition] = {}
        self._chunked: dict[tuple, Partition] = {}
        self._chosen: dict[tuple, Partition] = {}
        self._polished: dict[tuple, tuple[Polished, StepPrediction]] = {}

    def with_cluster(self, cluster: ClusterSpec) -> Pricer:
        """A Pricer of the same graph and constants on ``cluster`` (another node-group order) that
        shares the tp solves: they are keyed by the tp group's node group, not by the order."""
        return Pricer(self.graph, cluster, self.c, _solves=self._solves)

    # -- tensor-parallel solves and layer tables ------------------------------------------------
    def tp_solve(self, tp: int, micro_batch: int, sequence_parallel: bool,
                 cluster: ClusterSpec | None = None) -> TpPricing:
        """The intra-op ILP's solve of the model on a ``tp`` group of ``cluster`` (default: this one)."""
        on = cluster or self.cluster
        key = (on.fingerprint(), tp, micro_batch, bool(sequence_parallel), self.graph.dtype)
        if key not in self._solves:
            self._solves[key] = tp_pricing(self.graph, on, tp=tp, micro_batch=micro_batch,
                                           sequence_parallel=sequence_parallel, c=self.c)
        return self._solves[key]

    def _priced_table(self, key: TableKey, cluster: ClusterSpec) -> LayerTable:
        tp, mb, sp, rec, knobs = _full_key(key)
        solve = self.tp_solve(tp, mb, sp, cluster) if tp > 1 else None
        return ilp_layer_table(self.graph, cluster, micro_batch=mb, tp=tp, sequence_parallel=sp, recompute=rec,
                               c=self.c, pricing=solve, knobs=knobs)

    def table(self, key: TableKey) -> LayerTable:
        """The layer table of ``key`` = (tp, micro-batch, sp, recompute), tp communication priced by the
        intra-op ILP (the Megatron count, with the reason in ``tp_note``, when the ILP cannot be used)."""
        key = _full_key(key)
        if key not in self._tables:
            self._tables[key] = self._priced_table(key, self.cluster)
        return self._tables[key]

    def bound_table(self, key: TableKey) -> LayerTable:
        """``key``'s layer table without tensor-parallel communication (``tp_pricing="none"``).

        Every array but ``tp_comm_s`` (and full recomputation's repeat of the forward collectives) is
        the priced table's, and those only add non-negative seconds, so its times are lower bounds and
        its memory is exact: the search bounds and memory-screens every family with it and runs the
        ILP only for configurations that survive (most families of a large cluster never need it).
        """
        key = _full_key(key)
        if key[0] == 1:  # no tp communication to leave out
            return self.table(key)
        bound_key = ("no-tp-comm", *key)
        if bound_key not in self._tables:
            tp, mb, sp, rec, knobs = key
            self._tables[bound_key] = layer_table(self.graph, self.cluster, micro_batch=mb, tp=tp,
                                                  sequence_parallel=sp, recompute=rec, c=self.c, tp_pricing="none",
                                                  knobs=knobs)
        return self._tables[bound_key]

    def _is_bound(self, cfg: ParallelConfig, table: LayerTable) -> bool:
        """Whether ``table`` is ``cfg``'s :meth:`bound_table` (without tp communication), not its priced one."""
        return table is self._tables.get(("no-tp-comm", *_full_key(table_key(cfg))))

    def _groups_like(self, cfg: ParallelConfig, table: LayerTable) -> list[LayerTable]:
        """The node groups' tables priced as ``table`` is (with or without tp communication)."""
        return self.group_tables(table_key(cfg), priced=not self._is_bound(cfg, table))

    def is_priced(self, key: TableKey) -> bool:
        """Whether ``key``'s tp communication has been priced already (its ILP solve has run)."""
        return _full_key(key) in self._tables

    def group_tables(self, key: TableKey, *, priced: bool = True) -> list[LayerTable]:
        """``key``'s layer table of every node group, each on its own device and links, in group order
        (``priced=False``: without tp communication). One group: the cluster's own table."""
        if len(self.cluster.groups) == 1:  # the one group's view prices exactly as the cluster itself
            return [self.table(key) if priced else self.bound_table(key)]
        key = _full_key(key)
        gkey = (priced, *key)
        if gkey not in self._group_tables:
            tp, mb, sp, rec, knobs = key
            views = [self.cluster.group_view(g) for g in range(len(self.cluster.groups))]
            self._group_tables[gkey] = [
                self._priced_table(key, view) if priced else layer_table(
                    self.graph, view, micro_batch=mb, tp=tp, sequence_parallel=sp, recompute=rec, c=self.c,
                    tp_pricing="none", knobs=knobs) for view in views]
        return self._group_tables[gkey]

    def position_tables(self, key: TableKey, pp: int, dp: int, *, priced: bool = True) -> list[LayerTable]:
        """The layer table each pipeline position is priced with (its device type; a position straddling
        types at its slowest member, as :func:`planner.cost.model.evaluate`)."""
        per_group = self.group_tables(key, priced=priced)
        return [per_group[self.cluster.slowest_group(span)] for span in self.cluster.position_groups(pp, dp * key[0])]

    # -- bounds -----------------------------------------------------------------------------------
    def work_bound_s(self, key: TableKey, pp: int, dp: int, *, priced: bool) -> float:
        """A lower bound on the busiest position's work per micro-batch.

        One device type: the busiest device works at least the average and the largest layer,
        ``max(Σ t / pp, max t)``. Mixed: position ``k`` runs its layers at its own speed,
        ``w_k = Σ_{l∈k} t_k(l) ≤ T``; for any weights ``μ_k ≥ 0``, ``T·Σ_k μ_k ≥ Σ_l min_k μ_k t_k(l)``
        (weak duality of the fractional split), with ``μ = 1`` and ``μ_k = 1 / Σ_l t_k(l)``, and
        ``T ≥ max_l min_k t_k(l)``. The one-group case of the mixed formula is the first one up to
        rounding; it is kept apart so the families' order (and so the plan) stays bit-identical, and
        it reads two cached sums instead of building a positions × layers array per family.
        ``priced=False`` leaves out tensor-parallel communication: still a lower bound, cheaper.
        """
        if len(self.cluster.groups) == 1:
            total_sum, total_max = (self.table(key) if priced else self.bound_table(key)).total_summary_s()
            return max(total_sum / pp, total_max)
        times = np.array([t.total_s for t in self.position_tables(key, pp, dp, priced=priced)])
        fastest = times.min(axis=0)  # [layer], over positions
        best = max(float(fastest.sum()) / pp, float(fastest.max()))
        mu = 1.0 / np.maximum(times.sum(axis=1), 1e-300)
        return max(best, float((times * mu[:, None]).min(axis=0).sum() / mu.sum()))

    def busiest_s(self, cfg: ParallelConfig, boundaries: tuple[tuple[int, int], ...]) -> float:
        """Per-micro-batch work of the busiest device (each at its own speed): every device runs all
        ``m`` micro-batches of it. One device type reads prefix sums (the search asks for every
        surviving configuration; the slices of the mixed case round differently)."""
        devices = schedules.chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
        work = [0.0] * cfg.pp
        key = table_key(cfg)
        if len(self.cluster.groups) == 1:
            prefix = self.table(key).total_prefix_s()
            for j, (a, b) in enumerate(boundaries):
                work[devices[j]] += float(prefix[b] - prefix[a])
            return max(work)
        tables = self.position_tables(key, cfg.pp, cfg.dp * cfg.cp)
        for j, (a, b) in enumerate(boundaries):
            work[devices[j]] += float(tables[devices[j]].total_s[a:b].sum())
        return max(work)

    def largest_usable_bytes(self) -> float:
        """The most memory any device may use (the memory lower bound is for the busiest device, which
        on a mixed cluster may be the one with the most memory)."""
        return max(usable_memory_bytes(self.cluster.group_view(g), self.c) for g in range(len(self.cluster.groups)))

    def memory_lower_bound(self, table: LayerTable, cfg: ParallelConfig) -> dict[str, float]:
        """No device of the configuration can need less than this.

        The devices of one replica together hold every layer; each device's memory is a sum of
        non-negative terms (model state, in-flight activations, maxima of buffers), so the busiest
        holds at least the whole model's memory at the smallest in-flight count divided by pp.
        """
        n = len(table.params)
        p, v = cfg.pp, cfg.virtual_stages
        flight = min(flights_of(cfg.schedule, p, cfg.num_micro_batches, v))
        parts = stage_memory(table, [(0, n)], in_flight=flight, cfg=cfg, c=self.c, is_last=False).as_dict()
        return {part: nbytes / p for part, nbytes in parts.items()}

    # -- partitions and predictions ---------------------------------------------------------------
    def _chunk_rows(self, cfg: ParallelConfig, table: LayerTable,
                    c: CostConstants) -> tuple[list[LayerTable], list[float]]:
        """The layer table each of the ``pp·v`` chunks is split at, and its position's usable memory.

        v = 1: each position's own device type, as :func:`planner.cost.model.evaluate` prices it
        (``table`` is this Pricer's ``table(key)`` or ``bound_table(key)``; the positions get the node
        groups' tables at the same pricing; one node group: ``table`` itself). v > 1: ``table`` for
        every chunk: a device runs several chunks, and balancing chunks at their devices' speeds
        piles chunks on the fast device (its work is the sum of its chunks, which a chain split cannot
        see); the time-balanced split is then priced per device by evaluate.
        """
        if cfg.virtual_stages > 1:  # time only: no limits
            return [table] * (cfg.pp * cfg.virtual_stages), []
        pos = positions(self.cluster, cfg, c, self._groups_like(cfg, table))
        return [p.table for p in pos], [p.limit for p in pos]

    def _stage_costs(self, cfg: ParallelConfig, table: LayerTable, c: CostConstants, rows: list[LayerTable],
                     limits: list[float], *, memory: bool) -> StageCosts:
        """The solver's input: one time row per chunk (one shared row when every chunk runs at the same
        table), and, with ``memory`` (v = 1), the memory of ``table`` against each position's limit."""
        one_row = all(r is rows[0] for r in rows)
        time = rows[0].total_s if one_row else np.stack([r.total_s for r in rows])
        if not memory:
            return StageCosts(time=time, micro_batches=cfg.num_micro_batches)
        flights = list(flights_of(cfg.schedule, cfg.pp, cfg.num_micro_batches, 1))
        return StageCosts(time=time, limit=limits[0] if len(set(limits)) == 1 else tuple(limits),
                          memory_matrix=stage_memory_matrix(table, cfg, c, p=cfg.pp, in_flight=flights),
                          micro_batches=cfg.num_micro_batches)

    def rule_split(self, rule: str, count: int) -> Partition:
        """The ``count`` chunks a fixed rule gives (status "given"): equal layers (``uniform``) or a
        framework's own split (:data:`planner.inter_op.framework_splits.FRAMEWORK_SPLITS`; status
        "infeasible" where that rule cannot split this model so: :func:`planner.api.evaluate` says why)."""
        key = ("rule", rule, count)
        if key not in self._free:
            if rule == "uniform":
                self._free[key] = Partition(uniform_partition(self.graph.num_layers, count), math.nan, "given")
            else:
                try:
                    self._free[key] = Partition(FRAMEWORK_SPLITS[rule](self.graph, count), math.nan, "given")
                except SpecError:
                    self._free[key] = Partition((), math.nan, "infeasible")
        return self._free[key]

    def split(self, cfg: ParallelConfig, table: LayerTable, *, balanced: bool = True,
              c: CostConstants | None = None, rule: str = "balanced") -> Partition:
        """Stage boundaries for ``cfg`` (not cached) from the stage solver
        (:func:`planner.inter_op.chain.partition_dp`): for v = 1 every stage at its own position's
        device speed and memory limit; for v > 1 time only at ``table``'s speed (:meth:`_chunk_rows`;
        memory is checked per device by evaluate); equal layers per stage unless ``balanced``. ``c``
        overrides the constants' memory limits (the given-configuration path prices a split that does
        not fit).
        """
        c = c or self.c
        count = cfg.pp * cfg.virtual_stages
        if rule not in SOLVED or not balanced:  # ``balanced=False``: equal layers, as before ``rule``
            return self.rule_split("uniform" if rule in SOLVED else rule, count)
        rows, limits = self._chunk_rows(cfg, table, c)
        part = partition_dp(self._stage_costs(cfg, table, c, rows, limits, memory=cfg.virtual_stages == 1), count)
        return self._device_balanced(cfg, table, c, part) if cfg.virtual_stages > 1 else part

    def _device_rows(self, cfg: ParallelConfig, table: LayerTable,
                     c: CostConstants) -> tuple[np.ndarray, list[float]]:
        """Each pipeline device's time per layer (one row shared on one device type) and usable memory."""
        if len(self.cluster.groups) == 1:
            return table.total_s, [usable_memory_bytes(self.cluster, c)] * cfg.pp
        pos = positions(self.cluster, cfg, c, self._groups_like(cfg, table))
        return np.stack([x.table.total_s for x in pos]), [x.limit for x in pos]

    def _schedule_choice(self, cfg: ParallelConfig, table: LayerTable, free: Partition, balanced: Partition,
                         gain_s: float) -> Partition:
        """The device-balanced split where it runs faster as the schedule runs it, else the min-max one.

        Balance lowers the busiest device's work, the steady state, and can lengthen the slowest chunk,
        the fill and drain, and the waits between unequal chunks (T5-11B, interleaved, 4 × 4 chunks, 8
        micro-batches: busiest device 0.2% lower, step 16% longer). Where balance gains under
        ``_BALANCE_GAIN`` of the busiest device's work the min-max split stays; otherwise both are priced
        (cached per configuration)."""
        if balanced.boundaries == free.boundaries or gain_s <= _BALANCE_GAIN * free.bottleneck_s * cfg.virtual_stages:
            return free
        key = (id(table), free.boundaries, balanced.boundaries, cfg)
        if key not in self._chosen:
            faster = (self.evaluate(cfg, balanced.boundaries, table).step_time_s
                      < self.evaluate(cfg, free.boundaries, table).step_time_s)
            self._chosen[key] = balanced if faster else free
        return self._chosen[key]

    def _device_balanced(self, cfg: ParallelConfig, table: LayerTable, c: CostConstants,
                         free: Partition, cutoff_s: float = math.inf) -> Partition:
        """v > 1: the chunk split that balances each device's work, each at its own speed
        (:mod:`planner.inter_op.device_balance`), from the min-max split ``free``; when a device is then
        over its memory limit and the others' headroom could take the excess, the split that also
        lowers what is over. Status "pruned" when the balanced split's busiest device times ``m`` already
        reaches ``cutoff_s`` (no split of these chunks has a less busy device, as far as the balance finds;
        moving layers for memory does not lower the busiest)."""
        devices = schedules.chunk_devices(cfg.schedule, cfg.pp, cfg.virtual_stages)
        time, limits = self._device_rows(cfg, table, c)
        key = (id(table), devices, free.boundaries, c is self.c, cfg.dp * cfg.cp)
        if key not in self._chunked:
            self._chunked[key] = balance_chunks(time, devices, free)
        balanced = self._chunked[key]
        if not balanced.feasible:
            return balanced
        busiest = {b: busiest_work(time, devices, b) for b in (free.boundaries, balanced.boundaries)}
        if cfg.num_micro_batches * busiest[balanced.boundaries] >= cutoff_s:
            return Partition((), balanced.bottleneck_bound_s, "pruned")  # the search would prune either split
        part = self._schedule_choice(cfg, table, free, balanced, busiest[free.boundaries] - busiest[balanced.boundaries])
        if cfg.num_micro_batches * busiest[part.boundaries] >= cutoff_s:
            return part
        flights = in_flight_per_device(cfg.schedule, p=cfg.pp, m=cfg.num_micro_batches, v=cfg.virtual_stages)

        @functools.cache
        def device_memory(d: int, chunks: tuple[tuple[int, int], ...]) -> float:
            return stage_memory(table, list(chunks), in_flight=flights[d], cfg=cfg, c=c,
                                is_last=(d == devices[-1])).total

        def memory(bounds: tuple[tuple[int, int], ...]) -> list[float]:  # a move changes few devices' chunks
            per: list[list[tuple[int, int]]] = [[] for _ in range(cfg.pp)]
            for d, chunk in zip(devices, bounds):
                per[d].append(chunk)
            return [device_memory(d, tuple(chunks)) for d, chunks in enumerate(per)]

        used = memory(part.boundaries)
        over = sum(max(0.0, m - lim) for m, lim in zip(used, limits))
        if over == 0 or over > sum(max(0.0, lim - m) for m, lim in zip(used, limits)):
            return part
        return balance_chunks(time, devices, part, memory=memory, limits=limits)

    def _chunk_bound_s(self, cfg: ParallelConfig, table: LayerTable, free: Partition) -> float:
        """v > 1: no split into ``p·v`` chunks has a device running less than this per micro-batch.

        ``free`` is the min-max split at ``table``'s speed, which on a mixed cluster is the slowest
        device's: a chunk on a faster device runs faster, so there the bound is the min-max split of
        the layers each at its fastest device type (a device runs at least its slowest chunk, which
        runs at least that fast)."""
        if len(self.cluster.groups) == 1:
            return free.bottleneck_bound_s
        count = cfg.pp * cfg.virtual_stages
        key = ("fastest", id(table), count)
        if key not in self._free:
            fastest = np.min(np.stack([t.total_s for t in self._groups_like(cfg, table)]), axis=0)
            self._free[key] = partition_dp(StageCosts(time=fastest, micro_batches=cfg.num_micro_batches), count)
        return self._free[key].bottleneck_bound_s

    def partition(self, cfg: ParallelConfig, table: LayerTable | None = None, *, balanced: bool = True,
                  cutoff_s: float = math.inf, rule: str = "balanced") -> Partition:
        """:meth:`split`, shared by configurations that differ only in what does not change it, or
        status "pruned" when even the time-only optimum cannot beat ``cutoff_s`` (the
        memory-constrained bottleneck is never below the unconstrained one).

        The time-only optimum of a (chunk tables, chunk count) is computed once (v > 1: the start of
        the device balance, :meth:`_device_balanced`); when it fits at every position it is also the
        memory-constrained optimum, else the constrained solve runs (cached by the memory-relevant
        knobs: schedule in-flight counts, ZeRO stage, dp). ``m`` is in the keys only where it weighs
        (chunks at different speeds: module docstring of :mod:`planner.inter_op.chain`). Tables are
        this Pricer's own, alive as long as it is, so their ``id`` names them.
        """
        table = table if table is not None else self.table(table_key(cfg))
        if rule not in SOLVED or not balanced:  # a fixed rule: nothing to solve
            return self.split(cfg, table, balanced=balanced, rule=rule)
        rows, limits = self._chunk_rows(cfg, table, self.c)
        one_row = all(r is rows[0] for r in rows)
        rows_key = (tuple(id(r) for r in rows), 0 if one_row else cfg.num_micro_batches)
        if rows_key not in self._free:
            self._free[rows_key] = partition_dp(self._stage_costs(cfg, table, self.c, rows, limits, memory=False),
                                                len(rows))
        free = self._free[rows_key]
        if cfg.virtual_stages > 1:  # the time-only split into p·v chunks, balanced per device
            bound = self._chunk_bound_s(cfg, table, free)
            if free.feasible and cfg.num_micro_batches * bound >= cutoff_s:
                return Partition((), bound, "pruned")  # no device runs less than a chunk
            if self._is_bound(cfg, table):  # the search's screen on the tables without tp comm reads only
                return replace(free, bottleneck_bound_s=bound)  # bound and status
            part = self._device_balanced(cfg, table, self.c, free, cutoff_s)
            return replace(part, bottleneck_bound_s=bound) if part.status != "pruned" else part
        p = cfg.pp
        flights = flights_of(cfg.schedule, p, cfg.num_micro_batches, 1)
        if free.feasible and all(
                stage_memory(table, [seg], in_flight=flights[k], cfg=cfg, c=self.c, is_last=(k == p - 1)).total
                <= limits[k] for k, seg in enumerate(free.boundaries)):
            return free
        if free.feasible and cfg.num_micro_batches * free.bottleneck_bound_s >= cutoff_s:
            return Partition((), free.bottleneck_bound_s, "pruned")
        key = (rows_key, flights, cfg.zero_stage, cfg.dp, cfg.shard_group, cfg.reshard_after_forward)
        if key not in self._bound:
            self._bound[key] = partition_dp(self._stage_costs(cfg, table, self.c, rows, limits, memory=True), p)
        return self._bound[key]

    def polish(self, cfg: ParallelConfig, boundaries: tuple[tuple[int, int], ...],
               table: LayerTable | None = None, start: StepPrediction | None = None) -> tuple[Polished, StepPrediction]:
        """The split local search on the simulated step reaches from ``boundaries``
        (:mod:`planner.inter_op.local_search`), and its prediction; with one pipeline stage, or a
        start that does not fit, ``boundaries`` itself. ``start``: the prediction of ``boundaries`` at
        ``table``, when the caller has it. Cached per (table, configuration, start)."""
        table = table if table is not None else self.table(table_key(cfg))
        key = (id(table), cfg, boundaries)
        if key not in self._polished:
            priced: dict[tuple[tuple[int, int], ...], StepPrediction] = {} if start is None else {boundaries: start}

            def step(b: tuple[tuple[int, int], ...]) -> float:
                pred = priced.get(b)
                if pred is None:
                    pred = priced[b] = self.evaluate(cfg, b, table)
                return pred.step_time_s if pred.fits else math.inf

            start = step(boundaries)
            chunks = cfg.pp * cfg.virtual_stages
            bubble = priced[boundaries].time_breakdown_s.get("pp_bubble", 0.0)
            if chunks < 2 or bubble < _POLISH_MIN_BUBBLE * start:  # not searched: no steps beyond the start
                found = Polished(boundaries, start, start, 0)
            else:  # each step simulates m micro-batches through every chunk: fewer steps where that is long
                budget = min(_POLISH_EVALS, max(_POLISH_MIN_EVALS, _POLISH_WORK // (cfg.num_micro_batches * chunks)))
                found = improve_split(boundaries, step, max_evals=budget)
                if found.gain < _POLISH_MIN_GAIN:  # not worth leaving the solver's (memory-balanced) split
                    found = Polished(boundaries, start, start, found.evaluations)
            self._polished[key] = (found, priced[found.boundaries])
        return self._polished[key]

    def evaluate(self, cfg: ParallelConfig, boundaries: tuple[tuple[int, int], ...] | list[tuple[int, int]],
                 table: LayerTable | None = None) -> StepPrediction:
        """:func:`planner.cost.model.evaluate` with this Pricer's tables (``table``: the whole cluster's,
        default ``table(cfg's key)``; each node group's from :meth:`group_tables`)."""
        key = table_key(cfg)
        table = table if table is not None else self.table(key)
        return evaluate(self.graph, self.cluster, cfg, list(boundaries), self.c, table=table,
                        group_tables=self.group_tables(key))
