"""The integer program's shape and names, time limits, infeasibility explanations, and agreement at medium size."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest

from planner.cluster import ClusterSpec
from planner.inter_op import build_problem, solve_stages
from planner.inter_op import fixtures as F
from planner.inter_op.ilp import StageILP, explain_infeasible

ONE_NODE = ClusterSpec.preset("dgx-a100-80g", nodes=1)
SETTING = dict(schedule="1f1b", num_micro_batches=32, micro_batch=8, tp=1, num_stages=4)


def test_every_constraint_family_is_present_and_named_uniquely():
    pr = build_problem(F.encoder_decoder(3, 3), ClusterSpec.preset("mixed-a100-v100"), schedule="1f1b",
                       num_micro_batches=8, micro_batch=4, tp=1)
    ilp = StageILP(pr)
    names = [r.name for r in ilp.lm.rows]
    assert len(names) == len(set(names))
    families = Counter(r.family for r in ilp.lm.rows)
    for family in ("one_stage", "slots_in_order", "chain", "first_stage", "devices", "offset", "node_shared",
                   "slice_fits", "whole_aligned", "transfer", "link", "bottleneck", "tail"):
        assert families[family] > 0, family
    # the p-dependent schedules get one program per stage count, each with every slot used
    zb = build_problem(F.uniform_blocks(4), ONE_NODE, schedule="zb-h1", num_micro_batches=4, micro_batch=2)
    with pytest.raises(AssertionError):
        StageILP(zb)
    fixed = StageILP(zb, p=3)
    assert all(fixed.lm.lb[v] == 1.0 for v in fixed.used.values())


@pytest.mark.parametrize("model, method", [("encoder_decoder", "cpsat"), ("big_branch", "cpsat"),
                                           ("imbalanced_lm", "cbc")])
def test_ilp_agrees_with_dp_at_medium_size(model, method):
    g = getattr(F, model)()
    pr = build_problem(g, ONE_NODE, **SETTING)
    dp = solve_stages(g, ONE_NODE, problem=pr, **SETTING)
    ilp = solve_stages(g, ONE_NODE, problem=pr, method=method, time_limit_s=120, **SETTING)
    assert ilp.status == "optimal" and dp.status == "optimal"
    assert ilp.objective_s == pytest.approx(dp.objective_s, rel=1e-6)
    assert ilp.bound_s <= dp.objective_s * (1 + 1e-12)


def test_ilp_time_limit_returns_best_plan_with_gap():
    g = F.imbalanced_lm(16, scale=4)
    cl = ClusterSpec.preset("mixed-a100-v100")
    kw = dict(schedule="1f1b", num_micro_batches=32, micro_batch=8, tp=1)
    sol = solve_stages(g, cl, method="cpsat", time_limit_s=2.0, **kw)
    dp = solve_stages(g, cl, **kw)
    assert sol.status in ("feasible", "time_limit", "optimal")
    assert sol.bound_s <= dp.objective_s * (1 + 1e-6)
    if sol.feasible:
        assert sol.objective_s >= dp.objective_s * (1 - 1e-6)
        assert sol.gap == pytest.approx((sol.objective_s - sol.bound_s) / sol.objective_s)


def _tight_cluster(memory_gib: float) -> ClusterSpec:
    base = ClusterSpec.preset("dgx-a100-80g", nodes=1, devices_per_node=2)
    dev = replace(base.groups[0].device, memory_bytes=int(memory_gib * 2**30))
    return replace(base, groups=(replace(base.groups[0], device=dev),))


def test_infeasible_solve_names_the_conflicting_constraints():
    specs = [F.LayerSpec(name=f"l{i}", gflops=10.0, params=600_000_000, act_mib=10.0, out_mib=1.0) for i in range(5)]
    kw = dict(schedule="1f1b", num_micro_batches=4, micro_batch=2, tp=1)
    heavy5 = F.synthetic_graph("heavy5", specs)  # 5 x 9.6 GB of weights and state on 2 x 20.8 GB usable
    for method in ("dp", "cpsat"):
        sol = solve_stages(heavy5, _tight_cluster(24), method=method, **kw)
        assert sol.status == "infeasible"
        assert "memory[s1]" in sol.notes[-1] and "memory[s2]" in sol.notes[-1]
    heavy4 = F.synthetic_graph("heavy4", specs[:4])
    assert explain_infeasible(build_problem(heavy4, _tight_cluster(24), **kw)) == []
    assert solve_stages(heavy4, _tight_cluster(24), **kw).layers_per_stage == (2, 2)
