"""The floor under tensor-parallel collectives in a multi-node pipeline (nanotron's trainer profile).

``CostConstants.pipelined_tp_collective_s`` + ``pipelined_tp_hop_s`` · (tp − 1) is the least device time
of each tp collective a stage launches once some pipeline cut crosses nodes: a floor under the chunk's
forward and backward, never an addition. Each test checks the number the floor must move, and what it
must leave alone (one node, tp = 1, pp = 1, compute-bound micro-batches, every other trainer).
"""

import dataclasses

import pytest

from planner.cluster import ClusterSpec
from planner.cost.calibrate import gpt_graph, megatron_boundaries
from planner.cost.constants import TRAINERS, CostConstants, trainer_constants
from planner.cost.model import evaluate, layer_table, pipelined_tp_floor_s
from planner.plan import ParallelConfig

C = CostConstants()
FLOOR = dataclasses.replace(C, pipelined_tp_collective_s=1e-3, pipelined_tp_hop_s=5e-4)


@pytest.fixture(scope="module")
def graph():
    return gpt_graph(8, 1024, 8, seq_len=512, vocab=8192)


def _predict(graph, cfg, c, nodes):
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=nodes)
    table = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                        sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c)
    bounds = megatron_boundaries(graph.num_layers, cfg.pp) if cfg.pp > 1 else [(0, graph.num_layers)]
    return evaluate(graph, cluster, cfg, bounds, c, table=table)


def _cfg(dp, tp, pp, mb=1, m=8, sp=True):
    return ParallelConfig(dp=dp, tp=tp, pp=pp, micro_batch_size=mb, num_micro_batches=m, schedule="1f1b",
                          sequence_parallel=sp and tp > 1)


def test_a_layer_counts_its_tensor_parallel_collectives(graph):
    cluster = ClusterSpec.preset("dgx-a100-80g")
    kw = dict(micro_batch=1, recompute="none", c=C)
    sp = layer_table(graph, cluster, tp=2, sequence_parallel=True, **kw)
    plain = layer_table(graph, cluster, tp=2, sequence_parallel=False, **kw)
    block = 1  # a GPT block: two all-reduces forward, two backward (Megatron); each a reduce-scatter + all-gather under sp
    assert plain.tp_calls[block] == 4 and sp.tp_calls[block] == 8
    assert sp.segment(1, 3).tp_calls == 16
    assert layer_table(graph, cluster, tp=1, sequence_parallel=False, **kw).tp_calls is None


def test_the_floor_applies_only_where_a_pipeline_cut_crosses_nodes():
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=2)
    w = 1e-3 + 5e-4 * (4 - 1)
    assert pipelined_tp_floor_s(cluster, _cfg(4, 4, 1), FLOOR) == 0  # no pipeline
    assert pipelined_tp_floor_s(cluster, _cfg(8, 1, 2), FLOOR) == 0  # no tensor parallelism
    assert pipelined_tp_floor_s(cluster, _cfg(1, 4, 2), FLOOR) == 0  # 8 ranks: both stages on node 0
    assert pipelined_tp_floor_s(cluster, _cfg(2, 4, 2), FLOOR) == pytest.approx(w)  # stage 1 on node 1
    assert pipelined_tp_floor_s(cluster, _cfg(1, 4, 4), FLOOR) == pytest.approx(w)  # one of three cuts crosses
    assert pipelined_tp_floor_s(cluster, _cfg(2, 4, 2), C) == 0  # the defaults (Megatron-LM) have none


def test_a_small_micro_batch_across_nodes_runs_at_the_floor(graph):
    cfg = _cfg(2, 4, 2, mb=1)
    base, floored = _predict(graph, cfg, C, 2), _predict(graph, cfg, FLOOR, 2)
    assert floored.step_time_s > 1.5 * base.step_time_s
    # each chunk's forward and backward are at least half its collectives times the floor
    per_collective = pipelined_tp_floor_s(ClusterSpec.preset("dgx-a100-80g", nodes=2), cfg, FLOOR)
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=2)
    table = layer_table(graph, cluster, micro_batch=1, tp=4, sequence_parallel=True, recompute="none", c=FLOOR)
    for (a, b), (f, bi, bw) in zip(megatron_boundaries(graph.num_layers, 2), floored.chunk_phase_times_s):
        half = table.segment(a, b).tp_calls * per_collective / 2
        assert f >= half and bi + bw >= half - 1e-12
    parts = floored.time_breakdown_s
    assert parts["pp_tp_wait"] > 0 and "pp_tp_wait" not in base.time_breakdown_s
    assert parts["pp_bubble"] >= 0
    assert sum(parts.values()) == pytest.approx(floored.step_time_s, rel=1e-9)


@pytest.mark.parametrize("cfg,nodes", [(_cfg(1, 4, 2), 2), (_cfg(16, 1, 2), 4), (_cfg(8, 4, 1), 4)],
                         ids=["one-node pipeline", "no tp", "no pipeline"])
def test_the_floor_leaves_other_configurations_alone(graph, cfg, nodes):
    assert _predict(graph, cfg, FLOOR, nodes).step_time_s == _predict(graph, cfg, C, nodes).step_time_s


def test_a_compute_bound_micro_batch_hides_the_floor(graph):
    """The floor is a minimum, not a charge: a micro-batch with more device work per collective than the
    floor prices as before (the sweep: mbs >= 2 tp ran as predicted without it)."""
    cfg = _cfg(2, 2, 2, mb=32, m=2)
    small = dataclasses.replace(C, pipelined_tp_collective_s=1e-5)
    assert _predict(graph, cfg, small, 2).step_time_s == _predict(graph, cfg, C, 2).step_time_s


def test_only_the_nanotron_profile_has_the_floor():
    assert trainer_constants("nanotron").pipelined_tp_collective_s > 0
    assert trainer_constants("nanotron").pipelined_tp_hop_s > 0
    others = [t for t in TRAINERS if t != "nanotron"]
    assert others and all(trainer_constants(t).pipelined_tp_collective_s == 0 for t in others)
    # nanotron is eager around fused element-wise kernels: Megatron's traffic, the eager host time
    eager, nano = trainer_constants("eager"), trainer_constants("nanotron")
    assert nano.elementwise_traffic_factor == C.elementwise_traffic_factor
    assert nano.op_dispatch_s == eager.op_dispatch_s
    assert nano.grad_accumulation_bytes_per_param == eager.grad_accumulation_bytes_per_param
