"""Context parallelism in the cost model (planner/cost/context_parallel.py): per-token work and memory
over cp, the K/V all-gather by hand, gradients over dp·cp, the search's choice at 128K, bad input."""

from __future__ import annotations

import dataclasses
import functools
import re

import numpy as np
import pytest

from planner.api import evaluate, plan
from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.context_parallel import kv_bytes_per_sample
from planner.cost.layer_table import NO_KNOBS, TableKnobs, layer_table
from planner.errors import SpecError
from planner.plan import ParallelConfig
from planner.resolve import resolve_model

C = CostConstants()


@functools.cache
def _graph(name: str, seq_len: int):
    return resolve_model(name, seq_len=seq_len, dtype="bf16").graph


def _table(graph, cluster, *, cp: int, tp: int = 8, recompute: str = "none", mb: int = 1):
    return layer_table(graph, cluster, micro_batch=mb, tp=tp, sequence_parallel=tp > 1, recompute=recompute, c=C,
                       knobs=TableKnobs(cp=cp))


def test_cp1_prices_to_the_same_bits():
    graph, cluster = _graph("llama-tiny", 32), ClusterSpec.preset("dgx-h100", nodes=2)
    a = layer_table(graph, cluster, micro_batch=2, tp=2, sequence_parallel=True, recompute="selective", c=C)
    b = layer_table(graph, cluster, micro_batch=2, tp=2, sequence_parallel=True, recompute="selective", c=C,
                    knobs=dataclasses.replace(NO_KNOBS, cp=1))
    for f in ("fwd_s", "bwd_input_s", "bwd_weight_s", "recompute_s", "tp_comm_s", "stored_act_bytes",
              "work_act_bytes", "output_bytes"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f
    assert b.cp_comm_s is None


def test_kv_width_reads_gqa_heads():
    # llama-tiny: hidden 64, 4 heads of 16, 2 kv heads: K + V = 2 * 2 * 16 = 64 values per token; 32 tokens, bf16
    graph = _graph("llama-tiny", 32)
    assert kv_bytes_per_sample(graph.layers[1], "bf16") == 32 * 64 * 2
    assert kv_bytes_per_sample(graph.layers[0], "bf16") == 0.0  # the embedding has no attention
    gpt = _graph("gpt-tiny", 64)  # fused qkv, 128 wide: K + V = 256 values per token
    assert kv_bytes_per_sample(gpt.layers[1], "bf16") == 64 * 256 * 2


def test_cp2_halves_the_work_and_adds_the_kv_gather():
    graph, cluster = _graph("llama2-7b", 4096), ClusterSpec.preset("dgx-h100", nodes=2)
    block = 1
    whole, half = _table(graph, cluster, cp=1, tp=1), _table(graph, cluster, cp=2, tp=1)
    ratio = half.fwd_s[block] / whole.fwd_s[block]
    assert 0.5 < ratio < 0.53, ratio  # half the tokens; GEMMs a little less efficient at the smaller m
    assert half.bwd_input_s[block] / whole.bwd_input_s[block] == pytest.approx(ratio, rel=0.02)
    one, two = _table(graph, cluster, cp=1), _table(graph, cluster, cp=2)  # tp = 8: cp crosses the nodes
    # The K/V all-gather forward, reduce-scatter backward, by hand: S = s · (k + v) · 2 bytes / tp on 2 ranks
    # 8 apart (two nodes: each rank's own NIC), ring (n-1)/n · S / (nic · e_net) + (n-1) · α.
    s_bytes = 4096 * (2 * 4096) * 2 / 8
    nic = 400e9 / 8 * C.network_efficiency
    one_way = 0.5 * s_bytes / nic + 5e-6
    assert two.cp_comm_s[block] == pytest.approx(2 * one_way, rel=1e-12)
    tp_only = two.tp_comm_s[block] - two.cp_comm_s[block]  # tp collectives on half the tokens (+ fixed host work)
    assert one.tp_comm_s[block] / 2 < tp_only < one.tp_comm_s[block]
    # stored activations: half the tokens', plus the gathered half of K and V kept for the backward
    assert two.stored_act_bytes[block] == pytest.approx(one.stored_act_bytes[block] / 2 + s_bytes / 2, rel=1e-12)
    assert two.output_bytes[block] == one.output_bytes[block] / 2


def test_gradients_reduce_over_dp_times_cp():
    from planner.cost.sharding import shard_groups

    cluster = ClusterSpec.preset("dgx-h100", nodes=2)
    cfg = ParallelConfig(dp=2, tp=4, pp=1, cp=2, micro_batch_size=1, num_micro_batches=1, zero_stage=1)
    group = shard_groups(cluster, cfg).shard
    assert group.size == 4  # dp · cp ranks, 4 apart: two on each node
    assert group.nodes == 2 and group.per_node == 2


def test_evaluate_refuses_a_cp_that_does_not_cut_the_sequence():
    cfg = ParallelConfig(dp=1, tp=1, pp=1, cp=3, micro_batch_size=1, num_micro_batches=1)
    with pytest.raises(SpecError) as err:
        evaluate("llama-tiny", ClusterSpec.preset("dgx-h100", nodes=1, devices_per_node=3, strict=False), cfg,
                 seq_len=32)
    assert err.value.field == "cp" and "2*cp must divide seq_len = 32" in str(err.value)


def test_evaluate_prices_cp_as_the_table_says():
    cluster = ClusterSpec.preset("dgx-h100", nodes=1)
    base = dict(dp=1, tp=4, pp=1, micro_batch_size=1, num_micro_batches=4, sequence_parallel=True)
    one = evaluate("llama2-7b", cluster, ParallelConfig(**base, cp=1), seq_len=4096, devices_per_node=4)
    two = evaluate("llama2-7b", cluster, ParallelConfig(**base, cp=2), seq_len=4096)
    ratio = two.predicted.step_time_s / one.predicted.step_time_s
    assert 0.5 < ratio < 0.62, ratio  # twice the devices on the same batch, less the K/V gathers
    note = next(line for line in two.explanation if "Context parallelism cp=2" in line)
    table = layer_table(_graph("llama2-7b", 4096), cluster, micro_batch=1, tp=4, sequence_parallel=True,
                        recompute="none", c=C, knobs=TableKnobs(cp=2))
    said = float(re.search(r": ([0-9.]+) s per step", note).group(1))
    assert said == pytest.approx(4 * float(table.cp_comm_s.sum()), abs=1e-3)  # 4 micro-batches, one device


def test_search_picks_cp_at_128k():
    # How long this plan takes (bar: 30 s) is `python -m bench --only planning_speed`'s, not a test's.
    p = plan("llama2-70b", "dgx-h100", nodes=16, global_batch=64, seq_len=131072, baselines=False)
    cfg = p.parallel
    assert cfg.cp > 1, cfg.label()
    assert p.model.seq_len == 131072
    assert 131072 % (2 * cfg.cp) == 0  # the balanced layout: 2·cp equal chunks per sequence
    assert cfg.dp * cfg.cp * cfg.tp * cfg.pp == 16 * 8, cfg.label()
    assert p.predicted.fits, p.predicted.peak_memory_bytes  # 128K tokens' activations fit once cut over cp


def test_only_rotary_presets_stretch_beyond_their_positions():
    graph = _graph("llama-tiny", 256)  # rotary: any length, traced with fused attention (no s x s scores)
    assert graph.seq_len == 256 and graph.attention == "fused"
    assert all(layer.attention_activation_bytes == 0 for layer in graph.layers)
    with pytest.raises(SpecError) as err:  # GPT's learned position table has 64 rows
        resolve_model("gpt-tiny", seq_len=128, dtype="bf16")
    assert err.value.field == "seq_len" and "learned" in str(err.value)


def test_a_cp_plan_lists_the_memory_of_every_rank():
    from planner.api import evaluate
    from planner.plan import ParallelConfig

    cfg = ParallelConfig(cp=2, pp=2, micro_batch_size=2, num_micro_batches=2)
    p = evaluate("gpt-tiny", "cpu-local", cfg, devices_per_node=4, dtype="fp32")
    assert len(p.predicted.memory_per_device_bytes) == cfg.world_size == 4
    assert sorted(set(p.predicted.memory_per_device_bytes)) == sorted({int(d.memory_bytes["total"])
                                                                       for d in p.predicted.devices})


def test_a_world_size_mismatch_names_cp():
    from planner.api import evaluate
    from planner.errors import SpecError
    from planner.plan import ParallelConfig

    with pytest.raises(SpecError, match=r"dp\*cp\*tp\*pp: got '2\*2\*1\*1=4'.*--dp/--cp/--tp/--pp"):
        evaluate("gpt-tiny", "cpu-local", ParallelConfig(dp=2, cp=2, micro_batch_size=1, num_micro_batches=1),
                 devices_per_node=2, dtype="fp32")
