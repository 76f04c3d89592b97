"""The stage solver equals brute force on random small chains with random memory limits.

One shared time row (a homogeneous cluster: the objective reduces to the min-max bottleneck) and
one row per stage (a mixed cluster: ``(m-1)·max + Σ`` of stages at their own speeds).
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest

from planner.inter_op import StageCosts, partition_dp, uniform_partition

sys.path.insert(0, str(Path(__file__).parent))
from brute import brute_force, min_max_brute_force  # noqa: E402


def _memory(rng: np.random.Generator, n: int, p: int):
    mem = rng.uniform(1.0, 10.0, size=n)
    flight = rng.uniform(1.0, p + 1.0, size=p)  # position-dependent in-flight factor

    def memory(i: int, j: int, k: int) -> float:
        return float(mem[i:j].sum() * flight[k] / p + mem[i:j].max()) if i < j else math.inf

    return mem, memory


def _random_costs(rng: np.random.Generator, n: int, p: int, *, rows: bool, matrix: bool,
                  integer_times: bool = False) -> StageCosts:
    shape = (p, n) if rows else (n,)
    time = rng.integers(1, 4, size=shape).astype(float) if integer_times else rng.uniform(0.1, 5.0, size=shape)
    mem, memory = _memory(rng, n, p)
    limit = float(rng.uniform(mem.mean() * 1.5, mem.sum() * 1.2))
    limits = tuple(limit * rng.uniform(0.7, 1.3, size=p)) if rows else limit
    m = int(rng.integers(1, 9))
    if not matrix:
        return StageCosts(time=time, memory=memory, limit=limits, micro_batches=m)
    full = [np.array([[memory(i, j, k) for j in range(n + 1)] for i in range(n + 1)]) for k in range(p)]
    return StageCosts(time=time, memory=memory, limit=limits, micro_batches=m,
                      memory_matrix=lambda k, r=slice(None), c=slice(None): full[k][r, c])


def _check(costs: StageCosts, p: int) -> None:
    exact = partition_dp(costs, p)
    oracle, value = brute_force(costs, p)
    assert exact.status == oracle.status
    if not oracle.feasible:
        return
    n = costs.num_layers
    assert exact.boundaries[0][0] == 0 and exact.boundaries[-1][1] == n
    assert all(a < b for a, b in exact.boundaries) and len(exact.boundaries) == p
    assert all(costs.memory(i, j, k) <= costs.stage_limit(k) for k, (i, j) in enumerate(exact.boundaries))
    assert costs.objective_s(exact.boundaries) == pytest.approx(value, rel=1e-9)
    worst = max(costs.stage_time(k, i, j) for k, (i, j) in enumerate(exact.boundaries))
    assert exact.bottleneck_s == pytest.approx(worst, rel=1e-12)
    # The bound is phase 1's min-max optimum: no feasible partition has a faster slowest stage.
    assert exact.bottleneck_bound_s == pytest.approx(min_max_brute_force(costs, p), rel=1e-12)


@pytest.mark.parametrize("seed", range(60))
def test_one_row_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 11))
    p = int(rng.integers(1, min(n, 4) + 1))
    costs = _random_costs(rng, n, p, rows=False, matrix=bool(seed % 2), integer_times=seed % 3 == 0)
    _check(costs, p)
    # One row: the objective is the min-max bottleneck, whatever m.
    exact = partition_dp(costs, p)
    if exact.feasible:
        assert exact.bottleneck_s == pytest.approx(min_max_brute_force(costs, p), rel=1e-12)


@pytest.mark.parametrize("seed", range(80))
def test_row_per_stage_matches_brute_force(seed):
    """Stages at their own speeds and limits: the Σ term matters and phase 2 must find the optimum."""
    rng = np.random.default_rng(5000 + seed)
    n = int(rng.integers(2, 10))
    p = int(rng.integers(1, min(n, 4) + 1))
    _check(_random_costs(rng, n, p, rows=True, matrix=bool(seed % 2), integer_times=seed % 3 == 0), p)


def test_phase_two_beats_the_min_max_split():
    """A slow first position: with few micro-batches the sum of the stage times decides.

    Stage 0 is 4x slower per layer than stage 1, 12 layers. Min-max puts 2 layers on stage 0
    (max(8, 10) = 10, sum 18); with m = 1 the objective is the sum, and 1 layer there wins
    (max(4, 11) = 11, sum 15). With m = 64 the bottleneck dominates: 63·10 + 18 < 63·11 + 15.
    """
    time = np.array([[4.0] * 12, [1.0] * 12])
    costs = StageCosts(time=time, micro_batches=1)
    part = partition_dp(costs, 2)
    assert part.boundaries == ((0, 1), (1, 12))
    assert costs.objective_s(part.boundaries) == 15.0 and part.bottleneck_s == 11.0
    assert part.bottleneck_bound_s == 10.0  # the min-max optimum, a lower bound for every split
    costs = StageCosts(time=time, micro_batches=64)
    assert partition_dp(costs, 2).boundaries == ((0, 2), (2, 12))


def test_infeasible_when_nothing_fits():
    costs = StageCosts(time=np.ones(4), memory=lambda i, j, k: 10.0, limit=1.0)
    assert partition_dp(costs, 2).status == "infeasible"
    assert brute_force(costs, 2)[0].status == "infeasible"
    assert partition_dp(costs, 5).status == "infeasible"  # more stages than layers


def test_uniform_partition_covers_all_layers():
    assert uniform_partition(10, 4) == ((0, 3), (3, 6), (6, 8), (8, 10))
