"""Min-max contiguous partition without memory limits, exactly, in O(L² log L) time at worst.

The optimal bottleneck is one of the O(L²) segment sums. For a candidate bound T, packing
layers greedily left to right (each stage as long as it stays ≤ T) uses the fewest stages
possible; T is feasible for exactly p non-empty stages iff that count is ≤ p and p ≤ L (a stage
can always be split without raising the maximum, since times are non-negative). Binary search
over the sorted candidates finds the smallest feasible T. Used by the search for the time-only
partition; the memory-constrained problem goes to :func:`planner.inter_op.chain.partition_dp`.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

from planner.inter_op.chain import Partition


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
