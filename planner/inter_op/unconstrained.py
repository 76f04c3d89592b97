"""Min-max contiguous partition without memory limits, exactly, in O(L² log L) time at worst.

The optimal bottleneck is one of the O(L²) segment sums. For a candidate bound T, packing
layers greedily left to right (each stage as long as it stays ≤ T) uses the fewest stages
possible; T is feasible for exactly p non-empty stages iff that count is ≤ p and p ≤ L (a stage
can always be split without raising the maximum, since times are non-negative). Binary search
over the sorted candidates finds the smallest feasible T. Used by the search for the time-only
partition; the memory-constrained problem goes to :func:`planner.inter_op.chain.partition_dp`.
"""

from __future__ import annotations

import math

import numpy as np

from planner.inter_op.chain import Partition


def _stages_needed(prefix: np.ndarray, bound: float) -> int:
    n = len(prefix) - 1
    start, count = 0, 0
    while start < n:
        # furthest end j with prefix[j] - prefix[start] <= bound (at least one layer)
        j = int(np.searchsorted(prefix, prefix[start] + bound * (1 + 1e-12), side="right")) - 1
        start = max(j, start + 1)
        count += 1
    return count


def partition_unconstrained(time: np.ndarray, p: int) -> Partition:
    n = len(time)
    if p < 1 or p > n:
        return Partition((), math.inf, "infeasible")
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(time, dtype=float))])
    seg = (prefix[None, :] - prefix[:, None])[np.triu_indices(n + 1, k=1)]
    candidates = np.unique(seg)
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _stages_needed(prefix, candidates[mid]) <= p:
            hi = mid
        else:
            lo = mid + 1
    bound = float(candidates[lo])
    # Greedy cuts under the optimal bound, then split the longest stages until there are p.
    cuts, start = [], 0
    while start < n:
        j = int(np.searchsorted(prefix, prefix[start] + bound * (1 + 1e-12), side="right")) - 1
        j = max(j, start + 1)
        cuts.append((start, j))
        start = j
    while len(cuts) < p:
        k = max(range(len(cuts)), key=lambda i: (cuts[i][1] - cuts[i][0], -i))
        a, b = cuts[k]
        cuts[k:k + 1] = [(a, b - 1), (b - 1, b)]
    value = max(float(prefix[b] - prefix[a]) for a, b in cuts)
    return Partition(tuple(cuts), value, "optimal")
