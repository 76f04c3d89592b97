"""Local search on the simulated step (planner.inter_op.local_search), against enumerating every split.

The oracle prices every split of small chains with the cost model itself (a real Pricer on a
synthetic graph, 1F1B and GPipe), so "best" here is the same simulated step the search improves.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from planner.cluster import ClusterSpec
from planner.inter_op.local_search import improve_split
from planner.plan import ParallelConfig
from planner.pricing import Pricer, table_key
from planner.space import SearchSpace

sys.path.insert(0, str(Path(__file__).parent))
import fixtures as F  # noqa: E402


def _splits(n: int, p: int):
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        yield tuple((edges[k], edges[k + 1]) for k in range(p))


def _single_moves(split):
    """Every split one cut away (one layer between two neighbours)."""
    cuts = [b for _, b in split[:-1]]
    n = split[-1][1]
    for k in range(len(cuts)):
        for d in (-1, 1):
            moved = list(cuts)
            moved[k] += d
            edges = [0, *moved, n]
            if all(edges[i + 1] > edges[i] for i in range(len(edges) - 1)):
                yield tuple((edges[i], edges[i + 1]) for i in range(len(edges) - 1))


def _pricer_step(graph, cfg):
    pricer = Pricer(graph, ClusterSpec.preset("dgx-a100-80g", nodes=1))
    table = pricer.table(table_key(cfg))

    def step(split):
        pred = pricer.evaluate(cfg, split, table)
        return pred.step_time_s if pred.fits else math.inf

    return pricer, step


CASES = [  # (graph, pp, micro-batches, schedule)
    (F.imbalanced_lm(8), 4, 4, "1f1b"),
    (F.imbalanced_lm(8), 3, 6, "gpipe"),
    (F.uniform_blocks(9), 4, 4, "1f1b"),
    (F.vit_large_stem(8), 3, 3, "1f1b"),
    (F.random_graph(np.random.default_rng(3), 10), 4, 8, "1f1b"),
]


@pytest.mark.parametrize("graph,pp,m,schedule", CASES, ids=[f"{g.name}-pp{p}-m{m}-{s}" for g, p, m, s in CASES])
def test_local_search_never_loses_and_ends_where_no_cut_move_helps(graph, pp, m, schedule):
    cfg = ParallelConfig(dp=1, tp=1, pp=pp, micro_batch_size=1, num_micro_batches=m, schedule=schedule)
    pricer, step = _pricer_step(graph, cfg)
    start = pricer.split(cfg, pricer.table(table_key(cfg))).boundaries
    found = improve_split(start, step, max_evals=10_000)
    every = {s: step(s) for s in _splits(graph.num_layers, pp)}
    best = min(every.values())
    assert found.step_s == pytest.approx(step(found.boundaries), rel=1e-12)
    assert found.step_s <= step(start) * (1 + 1e-12)
    assert found.step_s >= best * (1 - 1e-12)  # the oracle is a lower bound of anything found
    for near in _single_moves(found.boundaries):  # a local optimum: no one-layer move is faster
        assert step(near) >= found.step_s * (1 - 1e-6)
    # on these chains descent from the solver's split reaches the best split, or comes within 2%
    assert found.step_s <= best * 1.02


def test_a_pipeline_with_two_near_bottlenecks_gets_one_bottleneck_at_the_front():
    """GPT-3 1.3B, dp 2 pp 4, 8 micro-batches, 1F1B: the min-max split (7, 6, 7, 6) has two stages at
    the maximum; local search finds a faster step, and it is the one evaluate and plan report."""
    from planner.api import evaluate

    cfg = ParallelConfig(dp=2, tp=1, pp=4, micro_batch_size=1, num_micro_batches=8)
    plan = evaluate("gpt3-1.3b", "dgx-h100", cfg, nodes=1)
    uniform = evaluate("gpt3-1.3b", "dgx-h100", cfg, nodes=1, partition="uniform")
    exact = Pricer(*_resolved("gpt3-1.3b"))
    table = exact.table(table_key(cfg))
    solver_split = exact.split(cfg, table).boundaries
    solver_step = exact.evaluate(cfg, solver_split, table).step_time_s
    assert [b - a for a, b in solver_split] == [7, 6, 7, 6]
    assert plan.predicted.step_time_s < solver_step * 0.99
    assert plan.predicted.step_time_s <= uniform.predicted.step_time_s
    assert tuple((s.layer_start, s.layer_stop) for s in plan.stages) != solver_split
    assert any("local search" in line for line in plan.explanation)
    assert "local search" in plan.solver.method
    assert not any("local search" in line for line in uniform.explanation)  # a rule's split stays as given


def _resolved(model: str):
    from planner.api import _resolve_model

    graph = _resolve_model(model, seq_len=None, sample_input=None, dtype="bf16").graph
    return graph, ClusterSpec.preset("dgx-h100", nodes=1)


def test_the_budget_bounds_the_steps_priced_and_a_start_that_does_not_fit_stays():
    calls = []

    def step(split):
        calls.append(split)
        return float(sum((b - a) ** 2 * (k + 1) for k, (a, b) in enumerate(split)))

    start = ((0, 10), (10, 11), (11, 12), (12, 20))
    found = improve_split(start, step, max_evals=5)
    assert found.evaluations == len(calls) <= 5
    assert found.step_s <= found.start_s
    unfit = improve_split(start, lambda s: math.inf, max_evals=50)
    assert unfit.boundaries == start and unfit.evaluations == 1 and unfit.gain == 0.0
    alone = improve_split(((0, 5),), step)  # one stage: nothing to move
    assert alone.boundaries == ((0, 5),) and alone.evaluations == 1


def test_the_search_prices_its_best_at_the_improved_split():
    """plan() reports the step at the split local search reached, and the stages it writes are that split."""
    from planner import plan

    space = SearchSpace(pp=(4,), tp=(1,), dp=(2,), micro_batch_size=(1,), schedules=("1f1b",))
    p = plan("gpt3-1.3b", ClusterSpec.preset("dgx-h100", nodes=1), global_batch=16, space=space, baselines=False)
    graph, cluster = _resolved("gpt3-1.3b")
    pricer = Pricer(graph, cluster)
    cfg = p.parallel
    split = tuple((s.layer_start, s.layer_stop) for s in p.stages)
    assert pricer.evaluate(cfg, split).step_time_s == pytest.approx(p.predicted.step_time_s, rel=1e-9)
    assert p.predicted.step_time_s <= pricer.evaluate(cfg, pricer.split(cfg, pricer.table(table_key(cfg))).boundaries
                                                      ).step_time_s
