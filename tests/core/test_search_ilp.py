"""The joint search with tensor parallelism priced by the intra-op ILP.

A plan's predicted tp communication is the cost of the placements it carries (the same cached
solve, solved once), and pruning on the tp-communication-free bounds never loses the optimum.
"""

from __future__ import annotations

import math

import pytest

from planner import api
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.explain import placement_notes
from planner.intra_op import model as intra_model
from planner.intra_op.pricing import tp_pricing
from planner.plan import ParallelConfig
from planner.pricing import Pricer
from planner.search import SearchSpace, search
from planner.space import candidate_degrees, divisors, schedules_for, virtuals_for

C = CostConstants()


@pytest.fixture(scope="module")
def node() -> ClusterSpec:
    return ClusterSpec.preset("dgx-a100-80g")


@pytest.mark.parametrize("sp", [False, True], ids=["no-sp", "sp"])
def test_predicted_tp_comm_is_the_cost_of_the_placements(node, sp, monkeypatch):
    solves: list[tuple] = []
    real = intra_model.solve_model_ilp

    def counting(graph, mesh, device, **kw):
        solves.append((mesh.shape[0], kw["batch_size"], kw["sequence_parallel"]))
        return real(graph, mesh, device, **kw)

    monkeypatch.setattr(intra_model, "solve_model_ilp", counting)
    space = SearchSpace(tp=(2,), pp=(1,), sequence_parallel=(sp,), recompute=("none",))
    plan = api.plan("gpt-tiny", node, global_batch=16, space=space, baselines=False)
    cfg = plan.parallel
    assert (cfg.tp, cfg.pp, cfg.sequence_parallel) == (2, 1, sp)
    placements = plan.placements
    assert placements["options"]["micro_batch"] == cfg.micro_batch_size
    assert placements["options"]["sequence_parallel"] is sp
    per_micro_batch = sum(layer["comm_by_phase_s"]["fwd"] + layer["comm_by_phase_s"]["bwd"]
                          for layer in placements["layers"])
    assert per_micro_batch > 0
    # pp = 1: every layer is on the busiest device, m micro-batches each
    assert plan.predicted.time_breakdown_s["tp_comm"] == pytest.approx(cfg.num_micro_batches * per_micro_batch,
                                                                       rel=1e-12)
    assert len(solves) == len(set(solves))  # every (tp, micro-batch, sp) solved once, the plan's included
    assert (2, cfg.micro_batch_size, sp) in solves
    assert any("priced by the intra-op ILP" in line for line in plan.explanation)


def test_fallback_is_in_the_explanation(node):
    import torch

    from planner.models import load_preset
    from planner.trace import trace_model

    preset = load_preset("gpt-tiny")
    with torch.device("cpu"):
        coarse = trace_model(preset.build(), preset.sample_input(2), name="gpt-tiny", force_module_level=True)
    cfg = ParallelConfig(dp=4, tp=2, pp=1, micro_batch_size=2, num_micro_batches=2)
    placements, lines = placement_notes(tp_pricing(coarse, node, tp=cfg.tp, micro_batch=cfg.micro_batch_size,
                                                   sequence_parallel=False, c=C))
    assert placements is None
    assert any("Megatron all-reduce count" in line and "no op-level nodes" in line for line in lines)
    assert any("falls back" in line for line in lines)


def _exhaustive_best(graph, cluster, global_batch, space) -> float:
    """Every configuration the search enumerates, priced, no pruning: the fastest that fits."""
    pricer = Pricer(graph, cluster, C)  # fresh: the search's own caches play no part
    best = math.inf
    for tp, pp, dp in candidate_degrees(graph, cluster, global_batch, space):
        per_replica = global_batch // dp
        for mb in [b for b in divisors(per_replica) if b <= space.max_micro_batch_size]:
            m = per_replica // mb
            for sp in space.sequence_parallel:
                if sp and tp == 1:
                    continue
                for rec in space.recompute:
                    table = pricer.table((tp, mb, sp, rec))
                    for sched in schedules_for(pp, space):
                        for v in virtuals_for(sched, pp, m, graph.num_layers, space):
                            for zero in [z for z in space.zero_stage if pp == 1 or z <= 1]:
                                if zero and dp == 1:
                                    continue
                                cfg = ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mb, num_micro_batches=m,
                                                     virtual_stages=v, schedule=sched, recompute=rec,
                                                     sequence_parallel=sp, zero_stage=zero)
                                part = pricer.split(cfg, table)
                                if not part.feasible:
                                    continue
                                pred = pricer.evaluate(cfg, part.boundaries, table)
                                if pred.fits:
                                    best = min(best, pred.step_time_s)
    return best


def test_pruning_on_tp_free_bounds_keeps_the_optimum(node):
    """The search screens families with tables that leave tp communication out (lower bounds) and
    runs the ILP only for survivors; its best must equal exhaustive enumeration with ILP pricing."""
    resolved = api.resolve_model("gpt-tiny", dtype="bf16")
    space = SearchSpace(schedules=("1f1b", "gpipe"), recompute=("none", "full"), zero_stage=(0, 1),
                        max_micro_batch_size=4)
    result = search(resolved.graph, node, 32, space=space, constants=C, top_k=1)
    assert result.best is not None and result.pruned > 0
    assert result.best.step_time_s == pytest.approx(_exhaustive_best(resolved.graph, node, 32, space), rel=1e-12)
    assert result.lower_bound_s <= result.best.step_time_s
