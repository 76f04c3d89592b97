"""The stage model itself: placement, links, transfers, memory, tails and the objective, by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.model import layer_table, stage_memory
from planner.errors import SpecError
from planner.inter_op import build_problem, solve_stages
from planner.inter_op import fixtures as F
from planner.inter_op.problem import CROSS_GROUP, CROSS_NODE, SAME_NODE, _cut_bytes
from planner.plan import ParallelConfig

A100_2x4 = ClusterSpec.preset("dgx-a100-80g", nodes=2, devices_per_node=4)


def _sub(problem, devices, group=0):
    return next(sm.index for sm in problem.submeshes if sm.devices == devices and sm.group == group)


def test_submesh_shapes_are_slices_or_whole_nodes():
    pr = build_problem(F.uniform_blocks(8), A100_2x4, schedule="1f1b", num_micro_batches=4, micro_batch=8, tp=1)
    assert sorted((sm.devices, sm.nodes) for sm in pr.submeshes) == [(1, 0), (2, 0), (4, 1), (8, 2)]
    # replicas must divide the micro-batch: with micro-batch 2 only 1 and 2 replicas exist
    pr2 = build_problem(F.uniform_blocks(8), A100_2x4, schedule="1f1b", num_micro_batches=4, micro_batch=2, tp=1)
    assert sorted(sm.replicas for sm in pr2.submeshes) == [1, 2]
    pr3 = build_problem(F.uniform_blocks(8), A100_2x4, schedule="1f1b", num_micro_batches=4, micro_batch=8, tp=2)
    assert sorted((sm.devices, sm.replicas) for sm in pr3.submeshes) == [(2, 1), (4, 2), (8, 4)]


def test_placement_in_pipeline_order_and_links():
    pr = build_problem(F.uniform_blocks(8), A100_2x4, schedule="1f1b", num_micro_batches=4, micro_batch=8, tp=1)
    s1, s2, s4 = _sub(pr, 1), _sub(pr, 2), _sub(pr, 4)
    ranks, links = pr.place([s2, s2, s4])
    assert ranks == [(0, 1), (2, 3), (4, 5, 6, 7)]
    assert links == [SAME_NODE, CROSS_NODE]
    # a whole node cannot start in the middle of one, a slice cannot straddle two nodes
    assert "node boundary" in pr.place([s2, s4, s2])
    assert "does not fit" in pr.place([s1, s2, s2, s1, s2])  # the second slice would span devices 3-4
    assert "not every device" in pr.place([s4])
    ranks, links = pr.place([s1, s1, s2, s4])
    assert links == [SAME_NODE, SAME_NODE, CROSS_NODE]


def test_cross_group_link_is_slowest_and_transfers_use_fewer_replicas():
    cl = ClusterSpec.preset("mixed-a100-v100")
    g = F.uniform_blocks(8)
    pr = build_problem(g, cl, schedule="1f1b", num_micro_batches=4, micro_batch=8, tp=1)
    a2, a8, v8 = _sub(pr, 2, 0), _sub(pr, 8, 0), _sub(pr, 8, 1)
    j = 3
    assert pr.xfer[SAME_NODE, a2, a2, j] < pr.xfer[CROSS_NODE, a2, a2, j] < pr.xfer[CROSS_GROUP, a2, _sub(pr, 2, 1), j]
    # 8 replicas on one side, 2 on the other: the 2-replica side moves 4x the bytes per device
    assert pr.xfer[CROSS_NODE, a2, a8, j] == pr.xfer_side[CROSS_NODE, a2, j] > pr.xfer_side[CROSS_NODE, a8, j]
    assert math.isinf(pr.xfer[SAME_NODE, a8, a8, j])  # whole nodes never share a node with a neighbour
    assert math.isinf(pr.xfer[CROSS_NODE, a8, v8, j])  # different device types are different groups
    ranks, links = pr.place([a8, v8])
    assert links == [CROSS_GROUP] and ranks[1][0] == 8


def test_cut_bytes_relay_every_crossing_edge():
    g = F.encoder_decoder(3, 3)  # embed, 3 encoder, 3 decoder (each reads encoder.2), head
    cut = _cut_bytes(g)
    for j in range(g.num_layers + 1):
        crossing = sum(d["bytes"] for u, v, d in g.layer_graph.edges(data=True) if u < j <= v)
        assert cut[j] == pytest.approx(crossing)
    enc_out = g.layers[3].output_bytes
    # inside the decoder the encoder output rides along with the decoder activation
    assert cut[6] == pytest.approx(g.layers[5].output_bytes + enc_out)
    assert not g.is_chain()


def test_memory_matches_the_cost_model():
    g = F.imbalanced_lm(8)
    c = CostConstants()
    cl = ClusterSpec.preset("dgx-a100-80g", nodes=1)
    pr = build_problem(g, cl, schedule="1f1b", num_micro_batches=8, micro_batch=8, tp=2, constants=c)
    sm = next(s for s in pr.submeshes if s.replicas == 2)
    table = layer_table(g, cl, micro_batch=4, tp=2, sequence_parallel=False, recompute="none", c=c)
    cfg = ParallelConfig(dp=2, tp=2, pp=1, micro_batch_size=4)
    for i, j, flight, last in [(0, 3, 4.0, False), (3, 10, 1.0, True), (5, 6, 2.0, False)]:
        want = stage_memory(table, [(i, j)], in_flight=flight, cfg=cfg, c=c, is_last=last).total
        assert pr.memory(sm.index, flight, last)[i, j] == pytest.approx(want, rel=1e-12)


def test_objective_is_alpa_formula_with_transfers_and_tail():
    g = F.imbalanced_lm(6)
    cl = ClusterSpec.preset("dgx-a100-80g", nodes=1)
    pr = build_problem(g, cl, schedule="1f1b", num_micro_batches=8, micro_batch=8, tp=1)
    plan = [(0, 3, _sub(pr, 2)), (3, 6, _sub(pr, 2)), (6, 8, _sub(pr, 4))]
    cost = pr.evaluate(plan)
    assert cost.feasible
    assert cost.in_flight == (3.0, 2.0, 1.0)  # 1F1B: p - k micro-batches in flight
    assert cost.links == (SAME_NODE, SAME_NODE)
    t = [pr.time[c][i, j] for i, j, c in plan]
    x = [pr.xfer[SAME_NODE, plan[k][2], plan[k + 1][2], plan[k][1]] for k in range(2)]
    tails = [pr.grad_sync[c][i, j] + pr.optimizer[c][i, j] for i, j, c in plan]
    assert cost.objective_s == pytest.approx(7 * max(t + x) + sum(t) + sum(x) + max(tails), rel=1e-12)
    # gradient sync grows with replicas and is zero without them
    one = _sub(pr, 1)
    assert pr.grad_sync[one][1, 4] == 0.0 < pr.grad_sync[_sub(pr, 2)][1, 4] < pr.grad_sync[_sub(pr, 8)][1, 4]


def test_in_flight_for_schedules_that_depend_on_p():
    g = F.uniform_blocks(6)
    cl = ClusterSpec.preset("dgx-a100-80g", nodes=1, devices_per_node=4)
    one_f = build_problem(g, cl, schedule="1f1b", num_micro_batches=8, micro_batch=1, tp=1)
    zb = build_problem(g, cl, schedule="zb-h1", num_micro_batches=8, micro_batch=1, tp=1)
    assert one_f.flight_by_remaining is not None and zb.flight_by_remaining is None
    assert [zb.in_flight(3, k) for k in range(3)] == [3.0, 3.0, 3.0]
    assert [one_f.in_flight(3, k) for k in range(3)] == [3.0, 2.0, 1.0]


def test_errors_name_the_field_and_the_fix():
    g = F.uniform_blocks(4)
    cl = ClusterSpec.preset("dgx-a100-80g", nodes=1, devices_per_node=6)
    with pytest.raises(SpecError, match="tp must divide devices_per_node"):
        build_problem(g, cl, schedule="1f1b", num_micro_batches=4, micro_batch=4, tp=4)
    with pytest.raises(SpecError, match="synchronous one-chunk"):
        build_problem(g, A100_2x4, schedule="interleaved-1f1b", num_micro_batches=4, micro_batch=4)
    with pytest.raises(SpecError, match="num_stages"):
        build_problem(g, A100_2x4, schedule="1f1b", num_micro_batches=4, micro_batch=4, num_stages=5)
    with pytest.raises(SpecError, match="method"):
        solve_stages(g, A100_2x4, num_micro_batches=4, micro_batch=4, method="greedy")
    bad = F.uniform_blocks(4)
    bad.layer_graph.add_edge(3, 1, bytes=1.0)
    with pytest.raises(SpecError, match="topological order"):
        build_problem(bad, A100_2x4, schedule="1f1b", num_micro_batches=4, micro_batch=4)


def test_infeasible_when_nothing_fits_and_the_result_says_so():
    g = F.uniform_blocks(4, scale=40)  # 500M parameters per block
    small = ClusterSpec(name="small", groups=(replace(A100_2x4.groups[0], device=replace(
        A100_2x4.groups[0].device, memory_bytes=4 * 2**30)),))
    sol = solve_stages(g, small, num_micro_batches=4, micro_batch=4)
    assert sol.status == "infeasible" and not sol.feasible and sol.gap is None
    assert sol.to_dict()["objective_s"] is None


def test_stage_devices_pins_the_submesh_size():
    g = F.imbalanced_lm(8)
    cl = ClusterSpec.preset("dgx-a100-80g", nodes=1)
    sol = solve_stages(g, cl, num_micro_batches=16, micro_batch=8, num_stages=4, stage_devices=2)
    assert [s.replicas for s in sol.stages] == [2, 2, 2, 2]
    free = solve_stages(g, cl, num_micro_batches=16, micro_batch=8, num_stages=4)
    assert free.objective_s <= sol.objective_s
    assert np.isclose(free.bound_s, free.objective_s)
