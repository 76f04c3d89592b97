"""evaluate(): the breakdown adds up, the search's lower bound holds, options are priced and named."""

import itertools
from dataclasses import replace

import pytest

from planner.cluster import ClusterSpec
from planner.cost.calibrate import gpt_graph, megatron_boundaries
from planner.cost.constants import CostConstants
from planner.cost.model import evaluate, layer_table, tp_allreduces, tp_collectives
from planner.plan import ParallelConfig

C = CostConstants()


@pytest.fixture(scope="module")
def graph():
    return gpt_graph(16, 1024, 8, seq_len=512, vocab=8192)  # embed, 8 blocks, head


CONFIGS = [
    ParallelConfig(dp=2, tp=2, pp=4, micro_batch_size=2, num_micro_batches=8),
    ParallelConfig(dp=2, tp=2, pp=4, micro_batch_size=1, num_micro_batches=8, schedule="gpipe", recompute="full"),
    ParallelConfig(dp=2, tp=2, pp=4, micro_batch_size=1, num_micro_batches=8, schedule="interleaved-1f1b",
                   virtual_stages=2, recompute="selective", sequence_parallel=True),
    ParallelConfig(dp=2, tp=2, pp=4, micro_batch_size=1, num_micro_batches=8, schedule="zb-h1", zero_stage=1),
    ParallelConfig(dp=8, tp=2, pp=1, micro_batch_size=2, num_micro_batches=4, zero_stage=3),
    ParallelConfig(dp=16, tp=1, pp=1, micro_batch_size=4, num_micro_batches=2, zero_stage=2,
                   overlap_grad_reduce=True),
]


def _predict(graph, cfg, c=C):
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=2)
    table = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                        sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c)
    bounds = megatron_boundaries(graph.num_layers, cfg.pp * cfg.virtual_stages) if cfg.pp > 1 else \
        [(0, graph.num_layers)]
    return table, evaluate(graph, cluster, cfg, bounds, c, table=table)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label())
def test_breakdown_adds_up_and_the_search_bound_holds(graph, cfg):
    table, pred = _predict(graph, cfg)
    assert sum(pred.time_breakdown_s.values()) == pytest.approx(pred.step_time_s, rel=1e-9)
    assert all(v >= 0 for v in pred.time_breakdown_s.values()), pred.time_breakdown_s
    bound = cfg.num_micro_batches * float(table.total_s.sum()) / cfg.pp
    assert pred.step_time_s >= bound * (1 - 1e-12)
    assert 0 < pred.mfu < 1
    assert pred.fits


def test_breakdown_names_each_kind_of_exposed_communication(graph):
    _, pred = _predict(graph, CONFIGS[0])
    bd = pred.time_breakdown_s
    for key in ("compute", "recompute", "tp_comm", "pp_bubble", "pp_p2p_exposed", "dp_comm_exposed", "optimizer"):
        assert key in bd
    assert bd["tp_comm"] > 0 and bd["pp_bubble"] > 0 and bd["pp_p2p_exposed"] > 0 and bd["dp_comm_exposed"] > 0
    assert bd["recompute"] == 0


def test_overlapping_gradient_reduction_is_priced_and_stated(graph):
    cfg = ParallelConfig(dp=16, tp=1, pp=1, micro_batch_size=4, num_micro_batches=2)
    _, plain = _predict(graph, cfg)
    _, overlapped = _predict(graph, replace(cfg, overlap_grad_reduce=True))
    assert "dp_comm_exposed" in plain.time_breakdown_s
    assert "dp_comm_exposed_after_overlap" in overlapped.time_breakdown_s
    assert overlapped.time_breakdown_s["dp_comm_exposed_after_overlap"] < plain.time_breakdown_s["dp_comm_exposed"]
    assert overlapped.step_time_s < plain.step_time_s
    assert any("overlap" in note for note in overlapped.notes)


def test_zero3_pays_for_parameter_gathers_it_cannot_hide(graph):
    base = ParallelConfig(dp=16, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1)
    _, z0 = _predict(graph, base)
    _, z3 = _predict(graph, replace(base, zero_stage=3))
    assert z3.memory_per_stage[0].weights == pytest.approx(z0.memory_per_stage[0].weights / 16)
    slow = CostConstants(network_efficiency=0.01)  # a network so slow that prefetching cannot hide the gathers
    _, z3_slow = _predict(graph, replace(base, zero_stage=3), c=slow)
    assert z3_slow.time_breakdown_s["zero3_gather_exposed"] > 0


def test_megatron_tensor_parallel_collectives_per_layer(graph):
    s, h = 512, 1024
    embed, block, head = graph.layers[0], graph.layers[1], graph.layers[-1]
    fwd, bwd = tp_collectives(block, "bf16")
    assert fwd == [2 * s * h, 2 * s * h]  # after the attention projection and the second MLP linear
    assert bwd == [2 * s * h, 2 * s * h]  # before the QKV and the first MLP linear
    assert tp_collectives(head, "bf16") == ([], [2 * s * h])  # vocabulary-parallel head: input gradient only
    assert tp_collectives(embed, "bf16") == ([2 * s * h], [])  # vocabulary-parallel embedding: its output
    assert tp_collectives(block, "fp32") == ([4 * s * h] * 2, [4 * s * h] * 2)
    assert tp_allreduces(block) == 4


def test_scatter_gather_makes_cross_node_pipeline_sends_cheaper(graph):
    cfg = ParallelConfig(dp=1, tp=8, pp=2, micro_batch_size=1, num_micro_batches=8)
    _, sg = _predict(graph, cfg)
    _, plain = _predict(graph, cfg, c=CostConstants(pp_scatter_gather=False))
    assert sg.time_breakdown_s["pp_p2p_exposed"] < plain.time_breakdown_s["pp_p2p_exposed"]


def test_more_micro_batches_shrink_the_bubble_share(graph):
    shares = []
    for m in (4, 16, 64):
        _, pred = _predict(graph, ParallelConfig(dp=2, tp=2, pp=4, micro_batch_size=1, num_micro_batches=m))
        shares.append(pred.time_breakdown_s["pp_bubble"] / pred.step_time_s)
    assert shares == sorted(shares, reverse=True)
    assert shares[0] <= 3 / (4 + 3)  # at most (p-1)/(m+p-1), the equal-stage 1F1B bubble
    assert shares[-1] < 0.1


@pytest.mark.parametrize("rec, sp", list(itertools.product(("none", "selective", "full"), (False, True))))
def test_the_table_total_is_what_the_pipeline_runs(graph, rec, sp):
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=2)
    t = layer_table(graph, cluster, micro_batch=2, tp=4, sequence_parallel=sp, recompute=rec, c=C)
    assert (t.tp_comm_forward_s <= t.tp_comm_s).all()
    assert t.total_s.sum() == pytest.approx(
        float((t.fwd_s + t.bwd_input_s + t.bwd_weight_s + t.recompute_s + t.tp_comm_s).sum()))
