"""Baselines are faithful to DeepSpeed and torchgpipe; the solver beats them on imbalanced models, ties on uniform ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from planner.cluster import ClusterSpec
from planner.inter_op import baselines, build_problem, solve_stages, uniform_partition
from planner.inter_op import fixtures as F
from planner.inter_op.baselines import baseline_cuts, block_partition, deepspeed_partition_balanced

ONE_NODE = ClusterSpec.preset("dgx-a100-80g", nodes=1)
SETTING = dict(schedule="1f1b", num_micro_batches=32, micro_batch=8, tp=1, num_stages=4)


def test_block_partition_matches_torchgpipe_published_cases():
    # torchgpipe tests/test_balance.py: solve([1..6], 2) == [[1, 2, 3, 4], [5, 6]]; zeros split evenly
    assert block_partition([1, 2, 3, 4, 5, 6], 2) == [4, 2]
    assert block_partition([0, 0], 2) == [1, 1]
    with pytest.raises(ValueError):
        block_partition([42], 0)
    with pytest.raises(ValueError):
        block_partition([42], 2)


def _spread_brute_force(weights, parts):
    n = len(weights)
    best = None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        edges = (0, *cuts, n)
        sums = [sum(weights[a:b]) for a, b in zip(edges, edges[1:])]
        spread = max(sums) - min(sums)
        best = spread if best is None else min(best, spread)
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


def test_uniform_baseline_is_deepspeed_uniform():
    g = F.imbalanced_lm(16)
    pr = build_problem(g, ONE_NODE, **SETTING)
    assert baseline_cuts("uniform", g, pr, 4, 0) == list(uniform_partition(18, 4))
    # 'parameters' isolates the embedding and the head (each ~20 blocks of parameters)
    assert baseline_cuts("parameters", g, pr, 4, 0)[0] == (0, 1)
    assert baseline_cuts("parameters", g, pr, 4, 0)[-1] == (17, 18)


@pytest.mark.parametrize("stage_devices", [None, 2])
def test_uniform_model_ties_every_baseline(stage_devices):
    g = F.uniform_blocks(16)
    sol = solve_stages(g, ONE_NODE, stage_devices=stage_devices, **SETTING)
    base = baselines(g, ONE_NODE, **SETTING)
    assert sol.layers_per_stage == (4, 4, 4, 4)
    for name, b in base.items():
        assert b.status == "feasible" and b.gap is None
        assert b.objective_s == pytest.approx(sol.objective_s, rel=1e-9), name


def _imbalanced_models():
    from tests_helpers import traced

    return [F.imbalanced_lm(16), F.vit_large_stem(16), F.big_branch(), F.encoder_decoder(), traced("imbalanced-gpt")]


@pytest.mark.parametrize("index", range(5))
def test_solver_beats_every_baseline_on_imbalanced_models(index):
    g = _imbalanced_models()[index]
    pr = build_problem(g, ONE_NODE, **SETTING)
    sol = solve_stages(g, ONE_NODE, problem=pr, **SETTING)
    assert sol.status == "optimal"
    for name, b in baselines(g, ONE_NODE, problem=pr, **SETTING).items():
        assert b.feasible, name
        assert b.objective_s > sol.objective_s * 1.02, (g.name, name, b.objective_s, sol.objective_s)
    # restricted to the baselines' own sub-meshes (2 GPUs per stage) it is never worse than any of them
    equal = solve_stages(g, ONE_NODE, stage_devices=2, **SETTING)
    assert all(b.objective_s >= equal.objective_s * (1 - 1e-12) for b in baselines(g, ONE_NODE, **SETTING).values())
    assert equal.objective_s >= sol.objective_s * (1 - 1e-12)
