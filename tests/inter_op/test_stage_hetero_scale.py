"""A mixed A100 + V100 cluster, and GPT-3 175B's layer costs over 1024 devices."""

from __future__ import annotations

from dataclasses import replace

import pytest

from planner.cluster import ClusterSpec
from planner.inter_op import baselines, build_problem, solve_stages
from planner.inter_op import fixtures as F

MIXED = ClusterSpec.preset("mixed-a100-v100")  # one DGX A100 node + one DGX-1 V100 node
SETTING = dict(schedule="1f1b", num_micro_batches=32, micro_batch=8, tp=1)


def homogeneous_view(cluster: ClusterSpec) -> ClusterSpec:
    """What a planner that assumes identical devices sees: every group gets the slowest device."""
    slow = cluster.device
    return replace(cluster, groups=tuple(replace(g, device=slow) for g in cluster.groups))


def mirrored(problem, stages):
    """The same cuts with the two node groups' roles swapped (sub-mesh of equal shape in the other group)."""
    out = []
    for i, j, c in stages:
        sm = problem.submeshes[c]
        twin = next(s for s in problem.submeshes if s.group != sm.group and s.devices == sm.devices)
        out.append((i, j, twin.index))
    return out


@pytest.mark.parametrize("model", ["uniform", "imbalanced"])
def test_mixed_cluster_puts_more_layers_on_the_faster_devices(model):
    g = F.uniform_blocks(24) if model == "uniform" else F.imbalanced_lm(16)
    pr = build_problem(g, MIXED, **SETTING)
    sol = solve_stages(g, MIXED, problem=pr, **SETTING)
    assert sol.status == "optimal"
    layers = {"A100": 0, "V100": 0}
    flops = {"A100": 0.0, "V100": 0.0}
    for s in sol.stages:
        layers[s.device_name[:4]] += s.num_layers
        flops[s.device_name[:4]] += sum(g.layers[k].fwd_flops for k in range(s.layer_start, s.layer_stop))
    assert flops["A100"] > 1.3 * flops["V100"] > 0, flops  # the A100s do more of the work
    if model == "uniform":  # with equal layers that means more layers
        assert layers["A100"] > layers["V100"], layers
    # memory limits are per device type: V100 stages are held to 32 GB, A100 stages to 80 GB
    for s in sol.stages:
        assert s.memory_limit_bytes < 32 * 2**30 if s.device_name.startswith("V100") else s.memory_limit_bytes > 70 * 2**30
    # the best split a homogeneous planner would make, priced on the real cluster, loses
    view = solve_stages(g, homogeneous_view(MIXED), **SETTING)
    homogeneous = [pr.evaluate(view.assignment), pr.evaluate(mirrored(pr, view.assignment))]
    homogeneous += [pr.evaluate(b.assignment) for b in baselines(g, MIXED, problem=pr, **SETTING).values() if b.feasible]
    best_homogeneous = min(c.objective_s for c in homogeneous if c.feasible)
    assert sol.objective_s < best_homogeneous / 1.2


def test_mixed_cluster_dp_and_cpsat_agree():
    g = F.uniform_blocks(8)
    kw = dict(schedule="1f1b", num_micro_batches=8, micro_batch=4, tp=2)
    pr = build_problem(g, MIXED, **kw)
    dp = solve_stages(g, MIXED, problem=pr, **kw)
    cp = solve_stages(g, MIXED, problem=pr, method="cpsat", time_limit_s=120, **kw)
    assert cp.status == "optimal"
    assert cp.objective_s == pytest.approx(dp.objective_s, rel=1e-6)


def test_gpt3_scale_over_1024_devices():
    """96 blocks + embedding + head on 128 DGX A100 nodes, tp 8: solved to optimality by the DP.

    (The timed benchmark on the traced model is ``python -m planner.inter_op.bench speed``.)
    """
    g = F.gpt3_like()
    cl = ClusterSpec.preset("dgx-a100-80g", nodes=128)
    sol = solve_stages(g, cl, schedule="1f1b", num_micro_batches=96, micro_batch=16, tp=8)
    assert sol.status == "optimal" and sol.gap == 0.0
    assert sum(len(s.ranks) for s in sol.stages) == 1024
    assert sum(sol.layers_per_stage) == 98
    assert all(s.memory_bytes <= s.memory_limit_bytes for s in sol.stages)
    assert all(s.submesh_shape[1] == 8 for s in sol.stages)  # tp 8 fills a node: whole-node sub-meshes
    # a time limit returns the first plan with an honest bound
    quick = solve_stages(g, cl, schedule="1f1b", num_micro_batches=96, micro_batch=16, tp=8, time_limit_s=1e-6)
    assert quick.status in ("feasible", "optimal") and quick.feasible
    assert quick.bound_s <= sol.objective_s * (1 + 1e-12) <= quick.objective_s * (1 + 1e-12)
    assert quick.gap == pytest.approx((quick.objective_s - quick.bound_s) / quick.objective_s)
