"""The partition baselines of the stage solver's benchmark are faithful to DeepSpeed and torchgpipe."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.partition_baselines import baseline_cuts, block_partition, deepspeed_partition_balanced
from planner.inter_op import uniform_partition

sys.path.insert(0, str(Path(__file__).parents[1] / "inter_op"))
import fixtures as F  # noqa: E402


def test_block_partition_matches_torchgpipe_published_cases():
    # torchgpipe tests/test_balance.py: solve([1..6], 2) == [[1, 2, 3, 4], [5, 6]]; zeros split evenly
    assert block_partition([1, 2, 3, 4, 5, 6], 2) == [4, 2]
    assert block_partition([0, 0], 2) == [1, 1]
    with pytest.raises(ValueError):
        block_partition([42], 0)
    with pytest.raises(ValueError):
        block_partition([42], 2)


def _spread_brute_force(weights, parts):
    n, best = len(weights), None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        edges = (0, *cuts, n)
        sums = [sum(weights[a:b]) for a, b in zip(edges, edges[1:])]
        best = max(sums) - min(sums) if best is None else min(best, max(sums) - min(sums))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_deepspeed_partition_balanced_minimises_the_spread(seed):
    """DeepSpeed's linear-partition DP keeps max - min of the part weights smallest (its objective)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 10))
    parts = int(rng.integers(1, n + 1))
    weights = [int(w) for w in rng.integers(1, 1000, size=n)]
    bounds = deepspeed_partition_balanced(weights, parts)
    assert bounds[0] == 0 and bounds[-1] == n and len(bounds) == parts + 1
    assert all(a < b for a, b in zip(bounds, bounds[1:]))
    sums = [sum(weights[a:b]) for a, b in zip(bounds, bounds[1:])]
    assert max(sums) - min(sums) == _spread_brute_force(weights, parts)


def test_baseline_cuts():
    g = F.imbalanced_lm(16)
    assert baseline_cuts("uniform", g, [], 4) == list(uniform_partition(18, 4))
    # 'parameters' isolates the embedding and the head (each ~20 blocks of parameters)
    cuts = baseline_cuts("parameters", g, [], 4)
    assert cuts[0] == (0, 1) and cuts[-1] == (17, 18)
    # 'time': torchgpipe's block partition of the layer times in integer microseconds (its case above)
    times = [k * 1e-6 + 1e-9 for k in range(1, 7)]
    assert baseline_cuts("time", F.uniform_blocks(6), times, 2) == [(0, 4), (4, 6)]
    with pytest.raises(ValueError, match="method"):
        baseline_cuts("nope", g, [], 4)
