"""The partition DP equals brute force on random small chains with random memory limits."""

import math

import numpy as np
import pytest

from planner.inter_op import StageCosts, brute_force, partition_dp, uniform_partition


def _random_costs(rng: np.random.Generator, n: int, p: int) -> StageCosts:
    time = rng.uniform(0.1, 5.0, size=n)
    mem = rng.uniform(1.0, 10.0, size=n)
    flight = rng.uniform(1.0, p + 1.0, size=p)  # position-dependent in-flight factor
    limit = float(rng.uniform(mem.mean() * 1.5, mem.sum() * 1.2))

    def memory(i: int, j: int, k: int) -> float:
        return float(mem[i:j].sum() * flight[k] / p + mem[i:j].max())

    def memory_vec(j: int, k: int) -> np.ndarray:
        return np.array([memory(i, j, k) for i in range(j)])

    return StageCosts(time=time, memory=memory, limit=limit, memory_vec=memory_vec)


@pytest.mark.parametrize("seed", range(60))
def test_dp_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 11))
    p = int(rng.integers(1, min(n, 4) + 1))
    costs = _random_costs(rng, n, p)
    exact = partition_dp(costs, p)
    oracle = brute_force(costs, p)
    assert exact.status == oracle.status
    if oracle.feasible:
        assert math.isclose(exact.bottleneck_s, oracle.bottleneck_s, rel_tol=1e-12)
        # The DP's own partition achieves what it claims and respects every limit.
        prefix = np.concatenate([[0.0], np.cumsum(costs.time)])
        assert max(prefix[j] - prefix[i] for i, j in exact.boundaries) == pytest.approx(exact.bottleneck_s)
        assert all(costs.memory(i, j, k) <= costs.limit for k, (i, j) in enumerate(exact.boundaries))
        assert exact.boundaries[0][0] == 0 and exact.boundaries[-1][1] == n


def test_infeasible_when_nothing_fits():
    costs = StageCosts(time=np.ones(4), memory=lambda i, j, k: 10.0, limit=1.0)
    assert partition_dp(costs, 2).status == "infeasible"
    assert brute_force(costs, 2).status == "infeasible"


def test_uniform_partition_covers_all_layers():
    assert uniform_partition(10, 4) == ((0, 3), (3, 6), (6, 8), (8, 10))


def _matrix_costs(rng: np.random.Generator, n: int, p: int, *, integer_times: bool) -> StageCosts:
    """Random costs with all three memory paths (scalar, vector, windowed matrix), which agree."""
    time = rng.integers(1, 4, size=n).astype(float) if integer_times else rng.uniform(0.1, 5.0, size=n)
    mem = rng.uniform(1.0, 10.0, size=n)
    flight = rng.uniform(1.0, p + 1.0, size=p)
    limit = float(rng.uniform(mem.mean() * 1.5, mem.sum() * 1.2))

    def memory(i: int, j: int, k: int) -> float:
        return float(mem[i:j].sum() * flight[k] / p + mem[i:j].max()) if i < j else math.inf

    full = [np.array([[memory(i, j, k) for j in range(n + 1)] for i in range(n + 1)]) for k in range(p)]

    def memory_vec(j: int, k: int) -> np.ndarray:
        return np.array([memory(i, j, k) for i in range(j)])

    def memory_matrix(k: int, rows: slice = slice(None), cols: slice = slice(None)) -> np.ndarray:
        return full[k][rows, cols]

    return StageCosts(time=time, memory=memory, limit=limit, memory_vec=memory_vec, memory_matrix=memory_matrix)


@pytest.mark.parametrize("seed", range(80))
def test_matrix_path_equals_vector_path_and_brute_force(seed):
    """The windowed matrix DP (what the search runs) returns the vector DP's partition exactly, ties
    included (integer times make many), and brute force's bottleneck."""
    rng = np.random.default_rng(1000 + seed)
    n = int(rng.integers(2, 13))
    p = int(rng.integers(1, min(n, 5) + 1))
    costs = _matrix_costs(rng, n, p, integer_times=seed % 2 == 0)
    vector_only = StageCosts(time=costs.time, memory=costs.memory, limit=costs.limit, memory_vec=costs.memory_vec)
    matrix, vector, oracle = partition_dp(costs, p), partition_dp(vector_only, p), brute_force(costs, p)
    assert matrix.status == vector.status == oracle.status
    assert matrix.boundaries == vector.boundaries
    if oracle.feasible:
        assert matrix.bottleneck_s == vector.bottleneck_s
        assert math.isclose(matrix.bottleneck_s, oracle.bottleneck_s, rel_tol=1e-12)
        assert all(costs.memory(i, j, k) <= costs.limit for k, (i, j) in enumerate(matrix.boundaries))
