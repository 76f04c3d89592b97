"""The bisection min-max partition equals brute force (no memory limits) on random chains."""


import sys
from pathlib import Path

import numpy as np
import pytest

from planner.inter_op.chain import StageCosts, partition_unconstrained

sys.path.insert(0, str(Path(__file__).parent))
from brute import min_max_brute_force  # noqa: E402


@pytest.mark.parametrize("seed", range(80))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(1, 11))
    p = int(rng.integers(1, n + 1))
    time = rng.uniform(0.0, 3.0, size=n) * (rng.random(n) > 0.2)  # some zero-cost layers
    fast = partition_unconstrained(time, p)
    oracle = min_max_brute_force(StageCosts(time=time), p)
    assert fast.bottleneck_s == pytest.approx(oracle, abs=1e-12)
    assert len(fast.boundaries) == p and fast.boundaries[0][0] == 0 and fast.boundaries[-1][1] == n
    assert all(b > a for a, b in fast.boundaries)
    prefix = np.concatenate([[0.0], np.cumsum(time)])
    assert max(prefix[b] - prefix[a] for a, b in fast.boundaries) == pytest.approx(fast.bottleneck_s)


@pytest.mark.parametrize("seed", range(20))
def test_furthest_end_is_numpys_searchsorted(seed):
    """The list-and-bisect packing step equals the numpy expression it replaced, bit for bit."""
    from planner.inter_op.chain import _furthest_end

    rng = np.random.default_rng(seed)
    time = rng.integers(0, 4, size=15).astype(float)  # zeros and equal sums: boundary ties
    prefix = np.concatenate([[0.0], np.cumsum(time)])
    for start in range(15):
        for bound in np.unique(prefix[None, :] - prefix[:, None]):
            old = int(np.searchsorted(prefix, prefix[start] + bound * (1 + 1e-12), side="right")) - 1
            assert _furthest_end(prefix.tolist(), start, float(bound)) == max(old, start + 1)
