"""plan() on a mixed cluster (one DGX A100 node + one DGX-1 V100 node): each pipeline position is
priced and split with its own device type's speed and memory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from planner.api import ResolvedModel, plan_resolved
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.memory import usable_memory_bytes
from planner.cost.model import evaluate, layer_table
from planner.errors import SpecError
from planner.inter_op.chain import partition_unconstrained
from planner.plan import ParallelConfig
from planner.pricing import Pricer
from planner.search import SearchSpace

sys.path.insert(0, str(Path(__file__).parents[1] / "inter_op"))
import fixtures as F  # noqa: E402

MIXED = ClusterSpec.preset("mixed-a100-v100")
C = CostConstants()


def test_position_groups_follow_the_rank_layout():
    assert MIXED.position_groups(2, 8) == ((0,), (1,))
    assert MIXED.position_groups(4, 4) == ((0,), (0,), (1,), (1,))
    assert MIXED.position_groups(1, 16) == ((0, 1),)  # one data-parallel replica set over both types
    assert [MIXED.group_index_of_rank(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    assert MIXED.slowest_group((0, 1)) == 1
    with pytest.raises(SpecError, match="pp\\*dp\\*tp"):
        MIXED.position_groups(3, 4)


@pytest.mark.parametrize("blocks", [8, 16, 24])
def test_plan_puts_more_layers_on_the_faster_devices(blocks):
    graph = F.uniform_blocks(blocks)
    out = plan_resolved(ResolvedModel(module=None, preset=None, graph=graph), MIXED, global_batch=64,
                        space=SearchSpace(pp=(2,), tp=(1,)), baselines=False)
    cfg = out.parallel
    assert (cfg.pp, cfg.dp, cfg.tp) == (2, 8, 1)
    cluster = out.cluster  # plan() may reorder the node groups (see below)
    a100 = [s for s in out.stages
            if cluster.groups[cluster.group_index_of_rank(s.ranks[0])].device.name.startswith("A100")]
    v100 = [s for s in out.stages if s not in a100]
    assert len(a100) == len(v100) == 1
    n_a = a100[0].layer_stop - a100[0].layer_start
    n_v = v100[0].layer_stop - v100[0].layer_start
    assert n_a >= 2 * n_v, (n_a, n_v)  # equal blocks: the A100 position takes at least twice the layers
    # the plan's prediction is evaluate's for the same configuration and split
    bounds = [(s.layer_start, s.layer_stop) for s in out.stages]
    pred = evaluate(graph, cluster, cfg, bounds, C)
    assert out.predicted.step_time_s == pytest.approx(pred.step_time_s, rel=1e-12)
    for st in out.predicted.stages:  # the timeline's phase times are the position's own device's too
        per_mb = sum(sum(phases) for phases in st["chunk_phase_times_s"])
        assert per_mb * cfg.num_micro_batches == pytest.approx(st["time_per_step_s"], rel=1e-9)
    # the split a single-device-type planner makes (all layers at V100 speed: equal halves) loses
    table = layer_table(graph, MIXED, micro_batch=cfg.micro_batch_size, tp=1, sequence_parallel=cfg.sequence_parallel,
                        recompute=cfg.recompute, c=C)
    old = partition_unconstrained(table.total_s, cfg.pp).boundaries
    assert [b - a for a, b in old] == [blocks // 2] * 2
    ratio = evaluate(graph, cluster, cfg, list(old), C).step_time_s / pred.step_time_s
    assert ratio > 1.5, ratio  # measured 1.66 / 1.68 / 1.71 for 8 / 16 / 24 blocks


def test_evaluate_prices_each_position_on_its_device():
    graph = F.uniform_blocks(16)
    cfg = ParallelConfig(dp=8, tp=1, pp=2, micro_batch_size=1, num_micro_batches=8, schedule="1f1b")
    pred = evaluate(graph, MIXED, cfg, [(0, 8), (8, 16)], C)
    assert pred.stage_device_names == ["A100-SXM4-80GB", "V100-SXM2-32GB"]
    assert pred.memory_limit_per_stage_bytes == [usable_memory_bytes(MIXED.group_view(g), C) for g in (0, 1)]
    # equal halves: the V100 position is the bottleneck, and its compute is the V100's
    assert pred.bottleneck_stage == 1
    v100 = layer_table(graph, MIXED.group_view(1), micro_batch=1, tp=1, sequence_parallel=False, recompute="none", c=C)
    a100 = layer_table(graph, MIXED.group_view(0), micro_batch=1, tp=1, sequence_parallel=False, recompute="none", c=C)
    steps = 2 * C.pipeline_step_overhead_s  # one chunk's forward and backward step per micro-batch
    assert pred.stage_times_s[1] == pytest.approx(float(v100.total_s[8:].sum()) + steps, rel=1e-9)
    assert pred.stage_times_s[0] == pytest.approx(float(a100.total_s[:8].sum()) + steps, rel=1e-9)
    assert pred.stage_times_s[1] > 2 * pred.stage_times_s[0]


def test_memory_limit_is_per_device_type():
    """A split that fits the A100's 80 GB but not the V100's 32 GB: evaluate flags only the V100 side,
    and the search's split moves layers off the V100 position."""
    graph = F.uniform_blocks(16, scale=3.0)  # about 5.3 GB per block and device under GPipe with m = 8
    cfg = ParallelConfig(dp=8, tp=1, pp=2, micro_batch_size=1, num_micro_batches=8, schedule="gpipe")
    table = layer_table(graph, MIXED, micro_batch=1, tp=1, sequence_parallel=False, recompute="none", c=C)
    halves = evaluate(graph, MIXED, cfg, [(0, 8), (8, 16)], C, table=table)
    heavy_a100 = evaluate(graph, MIXED, cfg, [(0, 12), (12, 16)], C, table=table)
    limit_a100, limit_v100 = heavy_a100.memory_limit_per_stage_bytes
    assert halves.memory_per_stage[0].total <= limit_a100 and halves.binding[0] != "memory (over the limit)"
    assert halves.memory_per_stage[1].total > limit_v100 and halves.binding[1] == "memory (over the limit)"
    assert not halves.fits  # the only split a single-device-type planner would price as 32 GB everywhere
    assert heavy_a100.memory_per_stage[0].total > limit_v100  # over 32 GB...
    assert heavy_a100.fits  # ...but within the A100's 80 GB
    part = Pricer(graph, MIXED, C).split(cfg, table)
    assert part.feasible and part.boundaries[0][1] >= 11, part
    assert evaluate(graph, MIXED, cfg, list(part.boundaries), C, table=table).fits


def test_straddling_configuration_is_priced_by_its_slowest_member():
    """pp = 1 puts data-parallel replicas on both device types: lock step, V100 speed, 32 GB."""
    graph = F.uniform_blocks(8)
    cfg = ParallelConfig(dp=16, tp=1, pp=1, micro_batch_size=1, num_micro_batches=4)
    pred = evaluate(graph, MIXED, cfg, [(0, 8)], C)
    v100 = layer_table(graph, MIXED.group_view(1), micro_batch=1, tp=1, sequence_parallel=False, recompute="none", c=C)
    assert pred.stage_times_s[0] == pytest.approx(float(v100.total_s.sum()), rel=1e-9)
    assert pred.memory_limit_per_stage_bytes == [usable_memory_bytes(MIXED.group_view(1), C)]
    assert pred.stage_device_names == ["A100-SXM4-80GB+V100-SXM2-32GB"]


def test_plan_tries_every_node_group_order_and_says_how_to_launch():
    """Ranks go group by group, so the group order decides which device type runs which pipeline
    position; plan() searches each order, and when it is not the file's says so."""
    from dataclasses import replace

    from planner.api import group_orders
    from planner.search import search

    graph = F.imbalanced_lm(12)
    space = SearchSpace(pp=(2,), tp=(1,))
    c = replace(C, pipeline_step_overhead_s=0.0)  # the order this test reasons about, without step overheads
    v100_first = replace(MIXED, groups=MIXED.groups[::-1])  # the cluster file lists the V100 node first
    orders = group_orders(v100_first)
    assert [o.groups for o in orders] == [v100_first.groups, MIXED.groups]
    per_order = [search(graph, o, 64, space=space, constants=c).best.step_time_s for o in orders]
    assert per_order[1] < per_order[0]  # here the A100 node first is faster (measured 0.1126 vs 0.1143 s)
    out = plan_resolved(ResolvedModel(module=None, preset=None, graph=graph), v100_first, global_batch=64,
                        space=space, baselines=False, constants=c)
    assert out.predicted.step_time_s == pytest.approx(per_order[1], rel=1e-12)
    chosen = out.cluster
    assert chosen.groups == MIXED.groups  # reordered, and the plan's cluster says so
    note = [line for line in out.explanation if line.startswith("Node-group order")]
    assert len(note) == 1 and "Launch the nodes in this order" in note[0], note
    # the file's order, when it is the fastest, is kept
    kept = plan_resolved(ResolvedModel(module=None, preset=None, graph=graph), MIXED, global_batch=64, space=space,
                         baselines=False, constants=c)
    assert kept.cluster.groups == MIXED.groups
    assert any("is the fastest" in line for line in kept.explanation)
    bounds = [(s.layer_start, s.layer_stop) for s in out.stages]
    assert evaluate(graph, chosen, out.parallel, bounds, c).step_time_s == pytest.approx(out.predicted.step_time_s,
                                                                                         rel=1e-12)
    # a homogeneous cluster has one order and no note
    assert group_orders(ClusterSpec.preset("dgx-a100-80g")) == [ClusterSpec.preset("dgx-a100-80g")]
