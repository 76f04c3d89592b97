r"""The stage solver: split a chain of layers into ``S`` contiguous stages, exactly, under memory limits.

Every stage ``s`` runs on its own pipeline position's device, so it has its own time per layer
``τ_s(l)`` (seconds per micro-batch; one row shared by every stage on a homogeneous cluster, one row
per stage on a mixed one) and its own memory limit. With ``t_s`` the time of stage ``s``'s layers
and ``m`` micro-batches, the solver minimises the synchronous pipeline's step time

.. math::

    F = (m - 1)\,\max_s t_s + \sum_s t_s

(``m - 1`` micro-batches behind the slowest stage, plus one micro-batch's fill and drain through
every stage: the 1F1B / GPipe step of :mod:`planner.schedules` without transfers) subject to
``memory_s(i, j) <= limit_s`` for the layers ``[i, j)`` of every stage. When every stage shares one
row, ``Σ_s t_s`` is the model's total whatever the cuts, and the optimum is PipeDream's min-max
partition; a homogeneous cluster is that one-row case, not a second solver.

Method, two phases on one recurrence over (stage, end layer) with prefix sums, vectorised over
the stage's window of (start, end):

1. **Min-max**: ``f_s(j) = min_i max(f_{s-1}(i), t_s(i, j))`` gives ``T₁``, the least possible
   bottleneck (no plan is faster per micro-batch), and a plan ``P₁`` reaching it. Without memory
   limits and with one shared row, :func:`partition_unconstrained` finds it faster: the optimal
   bottleneck is one of the O(L²) segment sums; for a candidate ``T``, packing layers greedily left
   to right (each stage as long as it stays ≤ T) uses the fewest stages possible, and ``T`` is
   feasible for exactly ``p`` non-empty stages iff that count is ≤ p ≤ L (a stage can always be
   split without raising the maximum); binary search over the sorted candidates finds the least.
2. **Sum under a cap**: ``F ≥ (m-1)·T₁ + Σ_l min_s τ_s(l)`` for every plan; when ``P₁`` meets this
   bound (always with one shared row) it is optimal. Otherwise ``g_s(j) = min_i g_{s-1}(i) + t_s(i, j)``
   over stages no slower than a cap ``T`` gives ``Σ*(T)``, non-increasing in ``T``; starting from the
   largest useful cap, each solve settles every cap down to its plan's own bottleneck ``T'``, and the
   next cap is just below ``T'``, until ``(m-1)·T₁ + Σ*`` cannot beat the best plan. Exact.

Tests: ``tests/inter_op/test_chain_oracle.py`` checks both phases against enumerating every
partition (``tests/inter_op/brute.py``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MemoryMatrix = Callable[[int, slice, slice], np.ndarray]
_REL = 1e-12  # relative slack when a plan is compared with a lower bound


@dataclass(frozen=True)
class StageCosts:
    """What the solver needs about a chain of ``L`` layers split into ``S`` stages.

    ``time``: seconds per micro-batch per layer, ``[L]`` (every stage alike) or ``[S, L]`` (stage ``s``
    at its own device's speed). ``memory_matrix(s, rows, cols)``: the block ``[rows, cols]`` of the
    ``(L+1, L+1)`` matrix whose ``[i, j]`` is the bytes per device of layers ``[i, j)`` as stage
    ``s``; or ``memory(i, j, s) -> bytes`` (slow; small cases); neither: time only. ``limit``: bytes
    per device, one for all stages or one per stage. ``micro_batches``: ``m`` of the objective.
    """

    time: np.ndarray
    memory: Callable[[int, int, int], float] | None = None
    limit: float | Sequence[float] = math.inf
    memory_matrix: MemoryMatrix | None = None
    micro_batches: int = 1

    @property
    def num_layers(self) -> int:
        return int(np.shape(self.time)[-1])

    @property
    def has_memory(self) -> bool:
        return self.memory_matrix is not None or self.memory is not None

    def row(self, s: int) -> np.ndarray:
        """Stage ``s``'s time per layer."""
        return self.time if np.ndim(self.time) == 1 else self.time[s]

    def stage_limit(self, s: int) -> float:
        return float(self.limit) if np.ndim(self.limit) == 0 else float(self.limit[s])

    def stage_time(self, s: int, i: int, j: int) -> float:
        prefix = np.concatenate([[0.0], np.cumsum(self.row(s))])
        return float(prefix[j] - prefix[i])

    def objective_s(self, boundaries: Sequence[tuple[int, int]]) -> float:
        """``(m-1)·max_s t_s + Σ_s t_s`` of a partition (module docstring)."""
        times = [self.stage_time(s, i, j) for s, (i, j) in enumerate(boundaries)]
        return (self.micro_batches - 1) * max(times) + sum(times)


@dataclass(frozen=True)
class Partition:
    """Stage boundaries; ``bottleneck_s``: their slowest stage's time per micro-batch;
    ``bottleneck_bound_s``: no partition of the same costs has a faster slowest stage (NaN: unknown)."""

    boundaries: tuple[tuple[int, int], ...]
    bottleneck_s: float
    status: str  # "optimal", "infeasible"; "given" / "pruned" from the Pricer
    bottleneck_bound_s: float = math.nan

    @property
    def feasible(self) -> bool:
        return self.status == "optimal"


def _infeasible() -> Partition:
    return Partition((), math.inf, "infeasible", math.inf)


def partition_dp(costs: StageCosts, p: int) -> Partition:
    """The exact optimum of the module docstring's objective for ``p`` stages, or status "infeasible"."""
    n = costs.num_layers
    if p < 1 or p > n:
        return _infeasible()
    chain = _Chain(costs, p)
    if not costs.has_memory and np.ndim(costs.time) == 1:  # one row, no memory: the binary search
        free = partition_unconstrained(costs.time, p)
        first = Partition(free.boundaries, free.bottleneck_s, free.status, free.bottleneck_s)
    else:
        first = chain.solve(np.maximum, math.inf)
    if not first.feasible:
        return first
    return chain.refine(first)


class _Chain:
    """The recurrence of the module docstring over one :class:`StageCosts` and stage count."""

    def __init__(self, costs: StageCosts, p: int) -> None:
        self.costs, self.p, self.n = costs, p, costs.num_layers
        self._prefix: dict[int, np.ndarray] = {}
        self._seg: dict[int, np.ndarray] = {}
        self._mem: dict[int, np.ndarray] = {}

    def _row_key(self, s: int) -> int:
        return 0 if np.ndim(self.costs.time) == 1 else s

    def prefix(self, s: int) -> np.ndarray:
        key = self._row_key(s)
        if key not in self._prefix:
            self._prefix[key] = np.concatenate([[0.0], np.cumsum(self.costs.row(s))])
        return self._prefix[key]

    def value(self, boundaries: Sequence[tuple[int, int]]) -> float:
        """The objective of a partition, from the cached prefix sums (as :meth:`StageCosts.objective_s`)."""
        times = [float(self.prefix(s)[j] - self.prefix(s)[i]) for s, (i, j) in enumerate(boundaries)]
        return (self.costs.micro_batches - 1) * max(times) + sum(times)

    def seg(self, s: int) -> np.ndarray:
        """``[i, j]``: time of layers ``[i, j)`` as stage ``s`` (infinite where ``i >= j``); one per row."""
        key = self._row_key(s)
        if key not in self._seg:
            prefix = self.prefix(s)
            seg = prefix[None, :] - prefix[:, None]
            seg[np.tril_indices(self.n + 1)] = math.inf
            self._seg[key] = seg
        return self._seg[key]

    def fits(self, s: int, rows: slice, cols: slice) -> np.ndarray | bool:
        """Where layers ``[i, j)`` fit in stage ``s``'s memory (True: no memory limits)."""
        costs = self.costs
        if costs.memory_matrix is not None:
            return costs.memory_matrix(s, rows, cols) <= costs.stage_limit(s)
        if costs.memory is None:
            return True
        if s not in self._mem:
            idx = range(self.n + 1)
            self._mem[s] = np.array([[costs.memory(i, j, s) if i < j else math.inf for j in idx] for i in idx])
        return self._mem[s][rows, cols] <= costs.stage_limit(s)

    def window(self, s: int) -> tuple[slice, slice]:
        """Starts and ends stage ``s`` can have on a path to a full partition.

        The ``s`` stages before it hold a layer each, so it starts at ``i >= s``; the ``p - 1 - s``
        after it do too, so it ends at ``j <= n - (p - 1 - s)``, and ``i < j``. Cells outside the
        window are infinite or lead to no partition of all ``n`` layers, so leaving them out changes
        neither the optimum nor the argmin (first minimum) of any column on the optimal path.
        """
        last_end = self.n - (self.p - 1 - s)
        return slice(s, last_end), slice(s + 1, last_end + 1)

    def solve(self, combine: Callable[[np.ndarray, np.ndarray], np.ndarray], cap: float) -> Partition:
        """``f_s(j) = min_i combine(f_{s-1}(i), t_s(i, j))`` over stages no slower than ``cap``.

        ``f`` holds the best value for each end of the previous stage, which is exactly the next
        window's rows. Once no end of stage ``s`` is reachable the answer is "infeasible" (most
        calls of the search end so: the first positions keep the most micro-batches in flight).
        """
        n = self.n
        f = np.full(n - self.p + 1, math.inf)  # over the first window's rows: the first stage starts at layer 0
        f[0] = 0.0
        windows: list[tuple[int, int, np.ndarray]] = []  # (first row, first column, argmin row per column)
        for s in range(self.p):
            rows, cols = self.window(s)
            seg = self.seg(s)[rows, cols]
            allowed = self.fits(s, rows, cols) & (seg <= cap) if math.isfinite(cap) else self.fits(s, rows, cols)
            cand = combine(f[:, None], seg)
            if allowed is not True:
                cand = np.where(allowed, cand, math.inf)
            windows.append((rows.start, cols.start, np.argmin(cand, axis=0)))
            f = cand.min(axis=0)  # = cand[argmin, column]: the best value per end
            if f.min() == math.inf:  # no stage s fits anywhere: every later f is infinite too
                return _infeasible()
        if not np.isfinite(f[-1]):
            return _infeasible()
        bounds = []
        j = n
        for row0, col0, arg in reversed(windows):
            i = row0 + int(arg[j - col0])
            bounds.append((i, j))
            j = i
        bounds.reverse()
        worst = max(float(self.seg(s)[i, j]) for s, (i, j) in enumerate(bounds))
        return Partition(tuple(bounds), worst, "optimal", worst)

    def refine(self, first: Partition) -> Partition:
        """Phase 2 of the module docstring: the least ``(m-1)·T + Σ*(T)`` over caps ``T >= T₁``."""
        costs, m1 = self.costs, self.costs.micro_batches - 1
        bound_t = first.bottleneck_s  # T₁: phase 1's optimum
        rows = np.asarray(costs.time, dtype=float).reshape(-1, self.n)
        sum_lb = float(rows.min(axis=0).sum())  # Σ_s t_s >= every layer at its fastest stage
        best, best_value = first, self.value(first.boundaries)
        if best_value <= (m1 * bound_t + sum_lb) * (1 + _REL):
            return best
        cap = (best_value - sum_lb) / m1 if m1 > 0 else math.inf
        while cap >= bound_t:
            plan = self.solve(np.add, cap)
            if not plan.feasible:
                break
            value = self.value(plan.boundaries)
            if value < best_value * (1 - _REL):
                best, best_value = Partition(plan.boundaries, plan.bottleneck_s, "optimal", bound_t), value
            plan_sum = value - m1 * plan.bottleneck_s
            if m1 == 0 or m1 * bound_t + plan_sum >= best_value * (1 - _REL):
                break  # every smaller cap sums to at least plan_sum
            cap = min(float(np.nextafter(plan.bottleneck_s, -math.inf)), (best_value - sum_lb) / m1)
        return best


def _furthest_end(prefix: list[float], start: int, bound: float) -> int:
    """The furthest end ``j`` with ``prefix[j] - prefix[start] <= bound`` (relative slack 1e-12),
    at least ``start + 1`` (a stage holds one layer at least).

    ``prefix`` is a Python list: ``bisect`` on it is ``np.searchsorted(side="right")`` on the same
    doubles without numpy's per-call overhead (the greedy packing calls this O(p log L²) times).
    """
    j = bisect.bisect_right(prefix, prefix[start] + bound * (1 + 1e-12)) - 1
    return max(j, start + 1)


def _stages_needed(prefix: list[float], bound: float) -> int:
    """Stages the greedy left-to-right packing under ``bound`` uses (the fewest possible)."""
    n = len(prefix) - 1
    start, count = 0, 0
    while start < n:
        start = _furthest_end(prefix, start, bound)
        count += 1
    return count


def partition_unconstrained(time: np.ndarray, p: int) -> Partition:
    """The min-max split of ``time`` into ``p`` contiguous non-empty stages (module docstring)."""
    n = len(time)
    if p < 1 or p > n:
        return Partition((), math.inf, "infeasible")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(time, dtype=float))])
    seg = (prefix[None, :] - prefix[:, None])[np.triu_indices(n + 1, k=1)]
    candidates = np.unique(seg).tolist()
    prefix_list = prefix.tolist()
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _stages_needed(prefix_list, candidates[mid]) <= p:
            hi = mid
        else:
            lo = mid + 1
    bound = candidates[lo]
    # Greedy cuts under the optimal bound, then split the longest stages until there are p.
    cuts, start = [], 0
    while start < n:
        j = _furthest_end(prefix_list, start, bound)
        cuts.append((start, j))
        start = j
    while len(cuts) < p:
        k = max(range(len(cuts)), key=lambda i: (cuts[i][1] - cuts[i][0], -i))
        a, b = cuts[k]
        cuts[k:k + 1] = [(a, b - 1), (b - 1, b)]
    value = max(float(prefix[b] - prefix[a]) for a, b in cuts)
    return Partition(tuple(cuts), value, "optimal")


def uniform_partition(n: int, p: int) -> tuple[tuple[int, int], ...]:
    """Equal layer counts per stage (earlier stages take the remainder): the 'uniform' baseline."""
    base, extra = divmod(n, p)
    out, start = [], 0
    for k in range(p):
        size = base + (1 if k < extra else 0)
        out.append((start, start + size))
        start += size
    return tuple(out)
