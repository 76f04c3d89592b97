"""Split a chain of layers into ``p`` contiguous pipeline stages, exactly, under memory limits.

Objective (PipeDream's): minimise the slowest stage's time per micro-batch. With equal
micro-batches, every synchronous schedule's step time grows with that bottleneck (the sum over
stages is fixed by the model), so this is the partition the pipeline wants.

Constraint: stage ``k`` (its pipeline position) fits in memory; the limit depends on ``k``
because schedules keep a different number of micro-batches in flight per position (1F1B: p on
the first stage, 1 on the last).

Method: dynamic programming over (position, end layer),
``f[k][j] = min_i max(f[k-1][i], t(i, j))`` over feasible ``(i, j, k)``, vectorised over ``i``
with prefix sums: O(p·L) vector operations of length L. ``brute_force`` enumerates every
partition and is the oracle in tests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StageCosts:
    """What the partitioner needs about a chain of layers.

    ``time``: seconds per micro-batch per layer (anything additive).
    ``memory(i, j, k) -> bytes`` for layers [i, j) at position k; ``memory_vec(j, k)`` may give the
    vector over all i < j at once (faster); ``limit`` is bytes per device.
    """

    time: np.ndarray
    memory: Callable[[int, int, int], float]
    limit: float
    memory_vec: Callable[[int, int], np.ndarray] | None = None
    # memory_matrix(k, rows, cols) = the block [rows, cols] of the (n+1, n+1) matrix whose [i, j] is
    # the memory of layers [i, j) at position k; fastest path.
    memory_matrix: Callable[[int, slice, slice], np.ndarray] | None = None


@dataclass(frozen=True)
class Partition:
    boundaries: tuple[tuple[int, int], ...]
    bottleneck_s: float
    status: str  # "optimal" or "infeasible"

    @property
    def feasible(self) -> bool:
        return self.status == "optimal"


def _segment_time(prefix: np.ndarray, i: int, j: int) -> float:
    return float(prefix[j] - prefix[i])


def partition_dp(costs: StageCosts, p: int) -> Partition:
    """Exact min-max partition of ``len(costs.time)`` layers into ``p`` stages under memory limits."""
    n = len(costs.time)
    if p < 1 or p > n:
        return Partition((), math.inf, "infeasible")
    prefix = np.concatenate([[0.0], np.cumsum(costs.time)])
    inf = math.inf
    if costs.memory_matrix is not None:
        return _partition_matrix(costs, p, prefix)
    f = np.full((p + 1, n + 1), inf)
    arg = np.full((p + 1, n + 1), -1, dtype=np.int64)
    f[0][0] = 0.0
    idx = np.arange(n + 1)
    for k in range(1, p + 1):
        pos = k - 1
        # Stage k ends at j in [k, n - (p - k)] and starts at i in [k-1, j-1].
        for j in range(k, n - (p - k) + 1):
            lo = k - 1
            prev = f[k - 1][lo:j]
            if not np.isfinite(prev).any():
                continue
            seg = prefix[j] - prefix[lo:j]
            cand = np.maximum(prev, seg)
            if costs.memory_vec is not None:
                mem = costs.memory_vec(j, pos)[lo:j]
            else:
                mem = np.array([costs.memory(i, j, pos) for i in idx[lo:j]])
            cand = np.where(mem <= costs.limit, cand, inf)
            best = int(np.argmin(cand))
            if cand[best] < f[k][j]:
                f[k][j] = cand[best]
                arg[k][j] = lo + best
    if not np.isfinite(f[p][n]):
        return Partition((), inf, "infeasible")
    bounds = []
    j = n
    for k in range(p, 0, -1):
        i = int(arg[k][j])
        bounds.append((i, j))
        j = i
    return Partition(tuple(reversed(bounds)), float(f[p][n]), "optimal")


def _stage_window(n: int, p: int, k: int) -> tuple[slice, slice]:
    """Starts and ends stage ``k`` of ``p`` (0-based) can have on a path to a full partition.

    The ``k`` stages before it hold a layer each, so it starts at ``i >= k``; the ``p - 1 - k``
    after it do too, so it ends at ``j <= n - (p - 1 - k)``, and ``i < j``. Cells outside the
    window are infinite or lead to no partition of all ``n`` layers, so leaving them out changes
    neither the optimum nor the argmin (first minimum) of any column on the optimal path.
    """
    last_end = n - (p - 1 - k)
    return slice(k, last_end), slice(k + 1, last_end + 1)


def _partition_matrix(costs: StageCosts, p: int, prefix: np.ndarray) -> Partition:
    """Same recurrence, one array operation per position over the stage's window of (start, end).

    ``f`` holds the best bottleneck for each end of the previous stage, which is exactly the next
    window's rows, so it never needs the full length. ``seg`` is infinite where ``i >= j`` (an
    empty stage), which makes a separate validity mask unnecessary. Once no end of stage ``k`` is
    reachable the answer is "infeasible" (most calls of the search end so: the first positions
    keep the most micro-batches in flight), and the remaining positions are not computed.
    """
    n = len(costs.time)
    seg = prefix[None, :] - prefix[:, None]  # seg[i, j] = time of layers [i, j)
    seg[np.tril_indices(n + 1)] = math.inf
    f = np.full(n - p + 1, math.inf)  # over the first window's rows: the first stage starts at layer 0
    f[0] = 0.0
    windows: list[tuple[int, int, np.ndarray]] = []  # (first row, first column, argmin row per column)
    for k in range(p):
        rows, cols = _stage_window(n, p, k)
        cand = np.maximum(f[:, None], seg[rows, cols])
        cand = np.where(costs.memory_matrix(k, rows, cols) <= costs.limit, cand, math.inf)
        windows.append((rows.start, cols.start, np.argmin(cand, axis=0)))
        f = cand.min(axis=0)  # = cand[argmin, column]: the best bottleneck per end
        if f.min() == math.inf:  # no stage k fits anywhere: every later f is infinite too
            return Partition((), math.inf, "infeasible")
    if not np.isfinite(f[-1]):
        return Partition((), math.inf, "infeasible")
    bounds = []
    j = n
    for row0, col0, arg in reversed(windows):
        i = row0 + int(arg[j - col0])
        bounds.append((i, j))
        j = i
    return Partition(tuple(reversed(bounds)), float(f[-1]), "optimal")


def brute_force(costs: StageCosts, p: int) -> Partition:
    """Every way to cut ``n`` layers into ``p`` non-empty contiguous stages: the oracle."""
    n = len(costs.time)
    prefix = np.concatenate([[0.0], np.cumsum(costs.time)])
    best: Partition = Partition((), math.inf, "infeasible")
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        segs = [(edges[k], edges[k + 1]) for k in range(p)]
        if any(costs.memory(i, j, k) > costs.limit for k, (i, j) in enumerate(segs)):
            continue
        value = max(_segment_time(prefix, i, j) for i, j in segs)
        if value < best.bottleneck_s - 1e-12:
            best = Partition(tuple(segs), value, "optimal")
    return best


def uniform_partition(n: int, p: int) -> tuple[tuple[int, int], ...]:
    """Equal layer counts per stage (earlier stages take the remainder): the 'uniform' baseline."""
    base, extra = divmod(n, p)
    out, start = [], 0
    for k in range(p):
        size = base + (1 if k < extra else 0)
        out.append((start, start + size))
        start += size
    return tuple(out)
