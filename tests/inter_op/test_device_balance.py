"""The multi-chunk split (planner.inter_op.device_balance) against enumerating every split.

It is a local search, so the oracle checks what it promises: the optimum on transformer-shaped chains
(near-equal blocks, a light embedding, a heavy head), never worse than the min-max start anywhere, and
on arbitrary chains near the optimum; with memory, a split that fits whenever one that fits exists.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from planner.inter_op.chain import StageCosts, partition_dp
from planner.inter_op.device_balance import balance_chunks
from planner.schedules.placement import chunk_devices


def _busiest(time: np.ndarray, devices: tuple[int, ...], bounds) -> float:
    work = [0.0] * (max(devices) + 1)
    for d, (a, b) in zip(devices, bounds):
        work[d] += float(time[a:b].sum())
    return max(work)


def _splits(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        yield tuple(zip(edges, edges[1:]))


def _case(rng: np.random.Generator, shaped: bool) -> tuple[np.ndarray, tuple[int, ...]]:
    p, v = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    if p * v > 9:
        v = 2
    n = int(rng.integers(p * v + 1, 12))
    if shaped:
        time = np.full(n, rng.uniform(0.9, 1.1))
        time[0], time[-1] = rng.uniform(0.0, 0.2), rng.uniform(0.5, 2.5)
    else:
        time = rng.uniform(0.2, 2.0, n)
    schedule = "interleaved-1f1b" if rng.integers(2) else "zb-v"
    return time, chunk_devices(schedule, p, v if schedule != "zb-v" else 2)


def test_transformer_shaped_chains_reach_the_optimum():
    rng = np.random.default_rng(7)
    for _ in range(150):
        time, devices = _case(rng, shaped=True)
        k = len(devices)
        start = partition_dp(StageCosts(time=time), k)
        got = balance_chunks(time, devices, start)
        best = min(_busiest(time, devices, s) for s in _splits(len(time), k))
        assert _busiest(time, devices, got.boundaries) == pytest.approx(best, rel=1e-9)
        assert got.bottleneck_bound_s == start.bottleneck_bound_s  # the min-max bound is kept
        assert [b for _, b in got.boundaries][-1] == len(time)
        assert all(a < b for a, b in got.boundaries)


def test_arbitrary_chains_never_worse_than_the_start_and_near_the_optimum():
    rng = np.random.default_rng(11)
    ratios = []
    for _ in range(150):
        time, devices = _case(rng, shaped=False)
        k = len(devices)
        start = partition_dp(StageCosts(time=time), k)
        got = balance_chunks(time, devices, start)
        mine = _busiest(time, devices, got.boundaries)
        assert mine <= _busiest(time, devices, start.boundaries) * (1 + 1e-9)
        ratios.append(mine / min(_busiest(time, devices, s) for s in _splits(len(time), k)))
    ratios = np.array(ratios)
    print(f"optimal {(ratios <= 1 + 1e-9).mean():.2f}, mean {ratios.mean():.4f}, worst {ratios.max():.4f}")
    assert (ratios <= 1 + 1e-9).mean() >= 0.75
    assert ratios.max() <= 1.2 and ratios.mean() <= 1.02


def test_memory_moves_layers_off_a_device_over_its_limit():
    """Device 0 holds more micro-batches in flight (as the first pipeline device does): the
    time-balanced split puts it over its limit; the memory pass finds a split that fits wherever
    enumeration finds one."""
    rng = np.random.default_rng(3)
    found = 0
    for _ in range(60):
        time, devices = _case(rng, shaped=True)
        k, p = len(devices), max(devices) + 1
        act = rng.uniform(0.8, 1.2, len(time))
        flights = np.linspace(2.0, 1.0, p)

        def memory(bounds, act=act, flights=flights, devices=devices, p=p):
            out = [0.0] * p
            for d, (a, b) in zip(devices, bounds):
                out[d] += float(act[a:b].sum()) * flights[d]
            return out

        start = balance_chunks(time, devices, partition_dp(StageCosts(time=time), k))
        limit = max(memory(start.boundaries)) * 0.9
        if max(memory(start.boundaries)) <= limit:
            continue
        got = balance_chunks(time, devices, start, memory=memory, limits=[limit] * p)
        fitting = [s for s in _splits(len(time), k) if max(memory(s)) <= limit]
        if fitting:
            found += 1
            assert max(memory(got.boundaries)) <= limit * (1 + 1e-9)
    assert found >= 10


def test_nothing_to_balance_returns_the_start():
    time = np.ones(6)
    start = partition_dp(StageCosts(time=time), 3)
    assert balance_chunks(time, (0, 1, 2), start) is start  # one chunk per device
    infeasible = partition_dp(StageCosts(time=time), 7)
    assert balance_chunks(time, (0, 1, 0, 1, 0, 1, 0), infeasible) is infeasible


def test_the_pricer_keeps_the_split_the_schedule_runs_faster():
    """Pricer.split for v > 1: the device-balanced split only where the cost model prices it faster
    than the min-max chunk split (balance can lengthen fill, drain and the waits between unequal
    chunks), and never a busier device than the min-max split."""
    import sys
    from pathlib import Path

    from planner.cluster import ClusterSpec
    from planner.cost.constants import CostConstants
    from planner.plan import ParallelConfig
    from planner.pricing import Pricer, table_key

    sys.path.insert(0, str(Path(__file__).parent))
    import fixtures as F

    cluster = ClusterSpec.preset("dgx-a100-80g").resized(nodes=1, devices_per_node=8)
    for graph in (F.imbalanced_lm(18), F.encoder_decoder(6, 10), F.uniform_blocks(17)):
        pricer = Pricer(graph, cluster, CostConstants())
        for schedule, v in (("interleaved-1f1b", 2), ("interleaved-1f1b", 3), ("zb-v", 2)):
            for m in (4, 8, 32):
                if schedule.startswith("interleaved") and m % 2:
                    continue
                cfg = ParallelConfig(dp=4, tp=1, pp=2, micro_batch_size=1, num_micro_batches=m,
                                     schedule=schedule, virtual_stages=v)
                table = pricer.table(table_key(cfg))
                rows, limits = pricer._chunk_rows(cfg, table, pricer.c)
                free = partition_dp(pricer._stage_costs(cfg, table, pricer.c, rows, limits, memory=False), 2 * v)
                got = pricer.split(cfg, table)
                assert got.feasible and len(got.boundaries) == 2 * v
                step = pricer.evaluate(cfg, got.boundaries, table).step_time_s
                assert step <= pricer.evaluate(cfg, free.boundaries, table).step_time_s * (1 + 1e-9)
                assert pricer.busiest_s(cfg, got.boundaries) <= pricer.busiest_s(cfg, free.boundaries) * (1 + 1e-9)


def test_the_multi_chunk_pruning_bound_holds_on_a_mixed_cluster():
    """The bound the search prunes v > 1 configurations with is below the busiest device's work of
    every split (each device at its own speed), found by enumeration. At the cluster table's speed
    (the slowest device's) it was not: a chunk on an A100 runs faster than that."""
    import sys
    from pathlib import Path

    from planner.cluster import ClusterSpec
    from planner.cost.constants import CostConstants
    from planner.plan import ParallelConfig
    from planner.pricing import Pricer, table_key

    sys.path.insert(0, str(Path(__file__).parent))
    import fixtures as F

    mixed = ClusterSpec.preset("mixed-a100-v100")
    graph = F.uniform_blocks(9)
    pricer = Pricer(graph, mixed, CostConstants())
    n = graph.num_layers
    above_old = 0
    for schedule, v in (("interleaved-1f1b", 2), ("zb-v", 2)):
        cfg = ParallelConfig(dp=8, tp=1, pp=2, micro_batch_size=1, num_micro_batches=8, schedule=schedule,
                             virtual_stages=v)
        table = pricer.table(table_key(cfg))
        part = pricer.partition(cfg, table)
        best = min(pricer.busiest_s(cfg, tuple(zip((0, *cuts), (*cuts, n))))
                   for cuts in itertools.combinations(range(1, n), 2 * v - 1))
        assert part.bottleneck_bound_s <= best * (1 + 1e-9)
        assert pricer.partition(cfg, table, cutoff_s=8 * best * 1.001).status != "pruned"
        old = partition_dp(StageCosts(time=table.total_s, micro_batches=8), 2 * v).bottleneck_bound_s
        above_old += old > best * (1 + 1e-9)
    assert above_old  # the slowest device's chunk bound would have pruned the best split


def test_a_moves_key_from_the_kept_split_equals_the_full_key():
    """The sweep prices a move from the chunks it changes (``_moved_key``); it must equal the key of
    the moved split summed afresh, to the bit, or the search would take other moves."""
    from planner.inter_op.device_balance import _Search

    rng = np.random.default_rng(7)
    for _ in range(200):
        p, v = int(rng.integers(2, 5)), int(rng.integers(2, 4))
        n = int(rng.integers(p * v + 2, 40))
        time = rng.random(n) if rng.random() < 0.5 else rng.random((p, n))
        devices = chunk_devices("zb-v" if v == 2 and rng.random() < 0.5 else "interleaved-1f1b", p, v)
        search = _Search(time, devices, None, ())
        cuts = [0, *sorted(rng.choice(np.arange(1, n), size=p * v - 1, replace=False).tolist()), n]
        for i in range(1, len(cuts) - 1):
            for trial in search._single(cuts, i) + search._windows(cuts, i):
                hi = i
                while trial[hi + 1] != cuts[hi + 1]:
                    hi += 1
                assert search._moved_key(cuts, trial, i, hi) == search.key(trial)
