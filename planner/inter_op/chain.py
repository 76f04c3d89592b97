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
    # memory_matrix(k)[i, j] = memory of layers [i, j) at position k, shape (n+1, n+1); fastest path.
    memory_matrix: Callable[[int], np.ndarray] | None = None


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


def _partition_matrix(costs: StageCosts, p: int, prefix: np.ndarray) -> Partition:
    """Same recurrence, one (n+1) x (n+1) array operation per position."""
    n = len(costs.time)
    seg = prefix[None, :] - prefix[:, None]  # seg[i, j] = time of layers [i, j)
    valid = np.triu(np.ones((n + 1, n + 1), dtype=bool), k=1)
    f = np.full(n + 1, math.inf)
    f[0] = 0.0
    args = []
    for k in range(p):
        cand = np.maximum(f[:, None], seg)
        ok = valid & (costs.memory_matrix(k) <= costs.limit)
        cand = np.where(ok, cand, math.inf)
        arg = np.argmin(cand, axis=0)
        f = cand[arg, np.arange(n + 1)]
        args.append(arg)
    if not np.isfinite(f[n]):
        return Partition((), math.inf, "infeasible")
    bounds = []
    j = n
    for k in range(p - 1, -1, -1):
        i = int(args[k][j])
        bounds.append((i, j))
        j = i
    return Partition(tuple(reversed(bounds)), float(f[n]), "optimal")


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
