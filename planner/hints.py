"""What would fit when nothing does: the node count, found by search, and the one-layer floor.

An infeasible plan suggests a node count. Scaling the nodes by the memory shortfall is wrong both
ways (67 nodes suggested where 128 is the first that fits), so :func:`nodes_that_fit` searches:

* a count below ``ceil(model state / (devices per node x usable memory))`` cannot fit (every
  parameter's weights, gradients and optimizer state live on some device), so the search starts
  there or just above the given count, whichever is larger;
* it doubles the count until the planner's own search (:func:`planner.search.search`, same
  :class:`~planner.pricing.Pricer` pricing) finds a configuration that fits;
* it bisects between the last count that did not fit and the first that did.

The answer fits, and the count below it does not. Fitting is not monotone in the node count (at
129 nodes no pp divides the devices where 128 fit), so the claim is about those two counts only.

Only memory decides whether a configuration fits, so each probe searches the memory-saving end of
every knob the caller left free (micro-batch 1, the most recomputation allowed); a smaller
micro-batch and more recomputation never need more memory. Degrees ``pp`` and ``dp`` are left free:
they must change with the count. Probes stop at :data:`HINT_BUDGET_S` seconds; the hint then says
what it found so far, and nothing it did not check.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.memory import model_state_bytes, stage_memory, usable_memory_bytes
from planner.cost.model import evaluate
from planner.plan import RECOMPUTE, ParallelConfig
from planner.plausible import RANGES
from planner.pricing import Pricer
from planner.space import SearchSpace, candidate_degrees, divisors, schedules_for, virtuals_for
from planner.trace.graph import CostGraph

HINT_BUDGET_S = 3.0  # an infeasible plan answers at most this much later
MAX_PROBES = 30


@dataclass(frozen=True)
class NodeHint:
    """``fits_at``: a count where a configuration fits (None: none found); ``fails_at``: the largest
    count known not to fit below it (``fits_at - 1`` when the bisection finished)."""

    fits_at: int | None
    fails_at: int
    complete: bool  # the bisection finished (or no count up to the cap fits)
    freed: tuple[str, ...] = ()  # the caller's fixed degrees the probes left free

    def phrase(self, nodes_now: int) -> str:
        """``"122 nodes (--nodes 122; found by search: 121 nodes do not fit)"`` or what is known."""
        freed = f", with {' and '.join(self.freed)} left free" if self.freed else ""
        if self.fits_at is None:
            return ""
        if self.complete:
            below = f"{self.fails_at} node{' does' if self.fails_at == 1 else 's do'} not fit"
            return f"{self.fits_at} nodes (--nodes {self.fits_at}{freed}; found by search: {below})"
        return (f"{self.fits_at} nodes (--nodes {self.fits_at}{freed}; found by search: {self.fails_at} do not fit, "
                "the counts between were not all checked)")


def _probe_space(space: SearchSpace) -> SearchSpace:
    recompute = max(space.recompute, key=RECOMPUTE.index)
    mb = (min(space.micro_batch_size),) if space.micro_batch_size else (1,)
    return replace(space, pp=None, dp=None, micro_batch_size=mb, recompute=(recompute,))


def state_floor_nodes(graph: CostGraph, cluster: ClusterSpec, c: CostConstants) -> int:
    """No count below this fits: the model state alone fills every device of it."""
    limit = usable_memory_bytes(cluster, c)
    state = model_state_bytes(graph, c)
    if limit <= 0:
        return math.inf  # type: ignore[return-value]
    return max(1, math.ceil(state / (limit * cluster.devices_per_node)))


def fits_somewhere(pricer: Pricer, global_batch: int, space: SearchSpace) -> bool:
    """Whether any configuration of ``space`` fits in memory on the pricer's cluster: the search's
    memory screen and stage split (:class:`planner.search._Search`) without its time pricing, stopping
    at the first fit. Memory is exact on the tables without tp communication (``bound_table``), so
    no tensor-parallel ILP runs; a homogeneous cluster's one group is the table itself."""
    graph, cluster, c = pricer.graph, pricer.cluster, pricer.c
    limit = pricer.largest_usable_bytes()
    for tp, pp, dp in candidate_degrees(graph, cluster, global_batch, space):
        per_replica = global_batch // dp
        mbs = [b for b in divisors(per_replica) if b <= space.max_micro_batch_size
               and (not space.micro_batch_size or b in space.micro_batch_size)]
        if not mbs:
            continue
        mb = min(mbs)  # the smallest micro-batch holds the fewest activations
        for sp in space.sequence_parallel:
            if sp and (tp == 1 or not graph.seq_len):
                continue
            for rec in space.recompute:
                table = pricer.bound_table((tp, mb, sp, rec))
                for sched in schedules_for(pp, space):
                    for v in virtuals_for(sched, pp, per_replica // mb, graph.num_layers, space):
                        for zero in space.zero_stage:
                            if (pp > 1 and zero > 1) or (zero and dp == 1):
                                continue
                            cfg = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mb,
                                                 num_micro_batches=per_replica // mb, virtual_stages=v, schedule=sched,
                                                 recompute=rec, sequence_parallel=sp, zero_stage=zero)
                            if pricer.memory_lower_bound(table, cfg)["total"] > limit:
                                continue
                            part = pricer.partition(cfg, table)
                            if not part.feasible:
                                continue
                            if evaluate(graph, cluster, cfg, list(part.boundaries), c, table=table,
                                        group_tables=[table]).fits:
                                return True
    return False


def nodes_that_fit(graph: CostGraph, cluster: ClusterSpec, global_batch: int, c: CostConstants,
                   space: SearchSpace | None = None, *, budget_s: float = HINT_BUDGET_S) -> NodeHint | None:
    """The smallest count above ``cluster.nodes`` found to fit, with the count below it that does not
    (module docstring); None on a mixed cluster (its groups are resized in the file, not here)."""
    from planner.pricing import Pricer

    if not cluster.is_homogeneous or usable_memory_bytes(cluster, c) <= 0:
        return None
    space = space or SearchSpace()
    freed = tuple(flag for flag, value in (("--pp", space.pp), ("--dp", space.dp)) if value)
    probe_space = _probe_space(space)
    start, cap = time.perf_counter(), int(RANGES["nodes"].high)
    probes: dict[int, bool] = {}

    def fits(n: int) -> bool | None:
        if n not in probes:
            if len(probes) >= MAX_PROBES or time.perf_counter() - start > budget_s:
                return None
            probes[n] = fits_somewhere(Pricer(graph, cluster.resized(nodes=n, strict=False), c), global_batch,
                                       probe_space)
        return probes[n]

    lo = max(cluster.nodes, state_floor_nodes(graph, cluster, c) - 1)  # known not to fit
    if lo >= cap:
        return NodeHint(None, lo, True, freed)
    hi = 2 ** math.ceil(math.log2(lo + 1))  # powers of two first: their counts divide most ways
    while True:
        found = fits(hi)
        if found is None:
            return NodeHint(None, lo, False, freed)
        if found:
            break
        lo = hi
        if hi >= cap:
            return NodeHint(None, lo, True, freed)
        hi = min(cap, 2 * hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        found = fits(mid)
        if found is None:
            return NodeHint(hi, lo, False, freed)
        lo, hi = (lo, mid) if found else (mid, hi)
    return NodeHint(hi, lo, True, freed)


def one_layer_floor(graph: CostGraph, cluster: ClusterSpec, c: CostConstants,
                    space: SearchSpace | None = None) -> tuple[float, str]:
    """The least memory one device needs to hold the heaviest layer alone: one layer per pipeline
    stage, the widest tensor parallelism allowed within a node, micro-batch 1, the most
    recomputation allowed, no data parallelism to shard over. Returns (bytes, how it was priced)."""
    space = space or SearchSpace()
    dpn = cluster.min_devices_per_node
    tp = max(space.tp) if space.tp else 2 ** int(math.log2(dpn))
    rec = max(space.recompute, key=RECOMPUTE.index)
    sp = bool(graph.seq_len) and tp > 1 and True in space.sequence_parallel
    cfg = ParallelConfig(dp=1, tp=tp, pp=graph.num_layers, micro_batch_size=1, num_micro_batches=graph.num_layers,
                         recompute=rec, sequence_parallel=sp)
    table = Pricer(graph, cluster, c).bound_table((tp, 1, sp, rec))
    n = graph.num_layers
    need = max(stage_memory(table, [(i, i + 1)], in_flight=1, cfg=cfg, c=c, is_last=(i == n - 1)).total
               for i in range(n))
    return need, f"tp={tp}, micro-batch 1, recompute={rec}{', sp' if sp else ''}"
