"""Expert parallelism priced (planner.cost.experts): state split by ep, the all-to-alls by hand,
ep = 1 unchanged, bad degrees refused, and the search choosing ep where memory needs it."""

import numpy as np
import pytest

from planner.api import plan
from planner.cluster import ClusterSpec
from planner.cost.comm import all_gather_s, all_reduce_s, reduce_scatter_s, strided_group
from planner.cost.constants import DTYPE_BYTES, CostConstants
from planner.cost.experts import expert_params, has_experts
from planner.cost.layer_table import TableKnobs, layer_table
from planner.cost.memory import stage_memory, stage_memory_matrix, stage_memory_vec, stage_params
from planner.cost.model import evaluate
from planner.errors import InfeasibleError, SpecError
from planner.plan import ParallelConfig
from planner.resolve import check_config
from planner.space import SearchSpace, ep_options
from planner.trace import trace_preset

C = CostConstants()


@pytest.fixture(scope="module")
def graph():
    return trace_preset("mixtral-tiny")  # 4 MoE blocks of 4 experts, top 2, capacity factor 1.0


@pytest.fixture(scope="module")
def node():
    return ClusterSpec.preset("dgx-h100", nodes=1)


def _table(graph, cluster, ep, *, mb=2, recompute="none"):
    return layer_table(graph, cluster, micro_batch=mb, tp=1, sequence_parallel=False, recompute=recompute, c=C,
                       knobs=TableKnobs(ep=ep))


def test_the_trace_records_the_routing(graph):
    moe = [layer for layer in graph.layers if layer.experts]
    assert len(moe) == 4 and has_experts(graph)
    r = moe[0].experts[0]
    assert (r.num_experts, r.top_k, r.capacity_factor, r.hidden) == (4, 2, 1.0, 64)
    assert r.expert_params == 3 * 4 * 64 * 64  # w_gate, w_up, w_down: [4, 64, 64] each
    assert not trace_preset("llama-tiny").layers[1].experts


def test_ep1_is_the_table_without_knobs(graph, node):
    plain = layer_table(graph, node, micro_batch=2, tp=1, sequence_parallel=False, recompute="none", c=C)
    one = _table(graph, node, 1)
    assert one.expert_params is None and one.all_to_all_s is None
    for name in ("fwd_s", "bwd_input_s", "bwd_weight_s", "recompute_s", "tp_comm_s", "stored_act_bytes", "params"):
        assert np.array_equal(getattr(plain, name), getattr(one, name)), name


def test_ep2_halves_the_expert_state_and_adds_the_all_to_alls(graph, node):
    one, two = _table(graph, node, 1), _table(graph, node, 2)
    i = next(j for j, layer in enumerate(graph.layers) if layer.experts)
    experts = expert_params(graph.layers[i])
    assert two.params[i] == graph.layers[i].param_count - experts / 2
    assert two.expert_params[i] == experts / 2
    # By hand: 2 samples x 32 tokens x top-2 x capacity 1.0 x hidden 64 values; two ranks on one node's
    # NVSwitch send half of it each way: (2-1)/2 · S / (bw · efficiency) + one latency.
    nbytes = 2 * 32 * 2 * 1.0 * 64 * DTYPE_BYTES[graph.dtype]
    link = node.intra_node
    one_a2a = 0.5 * nbytes / (link.bandwidth_bytes_per_s * C.link_efficiency) + link.latency_s
    assert two.tp_comm_fwd_s[i] - one.tp_comm_forward_s[i] == pytest.approx(2 * one_a2a, rel=1e-12)
    assert two.tp_comm_s[i] - one.tp_comm_s[i] == pytest.approx(4 * one_a2a, rel=1e-12)
    assert two.all_to_all_s[i] == pytest.approx(4 * one_a2a, rel=1e-12)
    assert np.array_equal(two.fwd_s, one.fwd_s)  # expert compute per rank unchanged
    full = _table(graph, node, 2, recompute="full")  # the recomputed forward dispatches again
    assert full.recompute_s[i] - _table(graph, node, 1, recompute="full").recompute_s[i] == \
        pytest.approx(2 * one_a2a, rel=1e-12)


def test_evaluate_memory_and_step(graph):
    cluster = ClusterSpec.preset("dgx-h100", nodes=1)
    w_b, g_b, o_b = C.state_bytes(graph.dtype)
    experts = sum(expert_params(layer) for layer in graph.layers)
    preds = {}
    for ep in (1, 2):
        cfg = ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=2, num_micro_batches=2, ep=ep)
        preds[ep] = evaluate(graph, cluster, cfg, [(0, graph.num_layers)], C, table=_table(graph, cluster, ep))
    m1, m2 = preds[1].memory_per_device[0], preds[2].memory_per_device[0]
    assert m1.weights - m2.weights == pytest.approx(w_b * experts / 2)
    assert m1.gradients - m2.gradients == pytest.approx(g_b * experts / 2)
    assert m1.optimizer - m2.optimizer == pytest.approx(o_b * experts / 2)
    assert "ep_all_to_all" not in preds[1].time_breakdown_s
    a2a = preds[2].time_breakdown_s["ep_all_to_all"]
    assert a2a == pytest.approx(2 * float(_table(graph, cluster, 2).all_to_all_s.sum()))  # 2 micro-batches
    assert sum(preds[2].time_breakdown_s.values()) == pytest.approx(preds[2].step_time_s)
    # by hand: the dense gradients all-reduced over the 8 dp ranks, the expert ones (half of them on a
    # rank) over the 4 ranks holding the same experts (every other dp rank)
    dense = g_b * (graph.param_count - experts)
    by_hand = all_reduce_s(dense, strided_group(cluster, 8, 1), C) + \
        all_reduce_s(g_b * experts / 2, strided_group(cluster, 4, 2), C)
    assert preds[2].time_breakdown_s["dp_comm_exposed"] == pytest.approx(by_hand, rel=1e-12)
    assert preds[1].time_breakdown_s["dp_comm_exposed"] == pytest.approx(
        all_reduce_s(g_b * graph.param_count, strided_group(cluster, 8, 1), C), rel=1e-12)


def test_bad_degrees_are_refused(graph):
    cluster = ClusterSpec.preset("dgx-h100", nodes=1)
    with pytest.raises(SpecError) as err:
        check_config(ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1, ep=8), graph, cluster)
    assert err.value.field == "ep" and "[1, 2, 4]" in str(err.value)
    check_config(ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1, ep=2, zero_stage=1),
                 graph, cluster)  # ZeRO with ep is priced (test_zero_with_ep_by_hand)
    with pytest.raises(SpecError, match="ep must divide it") as err:  # HSDP: the expert shard is dp_shard/ep
        check_config(ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1, ep=4, zero_stage=3,
                                    dp_shard=2), graph, cluster)
    assert err.value.field == "ep"
    with pytest.raises(SpecError, match="no mixture-of-experts"):
        check_config(ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1, ep=2),
                     trace_preset("llama-tiny"), cluster)
    check_config(ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1, num_micro_batches=1, ep=4), graph, cluster)


@pytest.mark.parametrize("zero", [1, 3])
def test_zero_with_ep_by_hand(graph, node, zero):
    # dp=8 ep=2 on one node: the dense states shard over the 8 dp ranks, the expert states (half the
    # experts on a rank) over the 4 ranks holding the same experts (every other rank); so each rank
    # holds 1/8 of the model's expert states too.
    c = CostConstants(fsdp_layer_overhead_s=0.0, comm_compute_overlap=0.0, optimizer_temp_bytes_per_param=0.0)
    w_b, g_b, o_b = c.state_bytes(graph.dtype)
    n, m = graph.num_layers, 2
    cfg = ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=2, num_micro_batches=m, ep=2, zero_stage=zero)
    table = layer_table(graph, node, micro_batch=2, tp=1, sequence_parallel=False, recompute="none", c=c,
                        knobs=TableKnobs(ep=2))
    pred = evaluate(graph, node, cfg, [(0, n)], c, table=table)
    experts = sum(expert_params(layer) for layer in graph.layers) / 2  # on one rank
    total = stage_params(table, 0, n)
    dense = total - experts
    assert total == graph.param_count - experts
    mem = pred.memory_per_device[0]
    assert mem.optimizer == pytest.approx(o_b * dense / 8 + o_b * experts / 4, rel=1e-12)
    if zero == 1:
        assert (mem.weights, mem.gradients) == (w_b * total, g_b * total)
    else:
        assert mem.weights == pytest.approx(w_b * dense / 8 + w_b * experts / 4, rel=1e-12)
        assert mem.gradients == pytest.approx(g_b * dense / 8 + g_b * experts / 4, rel=1e-12)
    all8, mine = strided_group(node, 8, 1), strided_group(node, 4, 2)  # dp, and the expert-data-parallel ranks
    if zero == 1:  # once per step: reduce-scatter the gradients, all-gather the updated weights
        by_hand = (reduce_scatter_s(g_b * dense, all8, c) + reduce_scatter_s(g_b * experts, mine, c)
                   + all_gather_s(w_b * dense, all8, c) + all_gather_s(w_b * experts, mine, c))
        assert pred.time_breakdown_s["dp_comm_exposed"] == pytest.approx(by_hand, rel=1e-12)
        assert pred.time_breakdown_s["zero3_gather_exposed"] == 0.0
    else:  # per micro-batch: two gathers (forward, backward) and a reduce-scatter
        per_mb = (2 * all_gather_s(w_b * dense, all8, c) + reduce_scatter_s(g_b * dense, all8, c)
                  + 2 * all_gather_s(w_b * experts, mine, c) + reduce_scatter_s(g_b * experts, mine, c))
        assert pred.time_breakdown_s["zero3_gather_exposed"] == pytest.approx(m * per_mb, rel=1e-12)
        assert pred.time_breakdown_s["dp_comm_exposed"] == 0.0
    assert all8.nodes == mine.nodes == 1 and mine.size == 4
    assert sum(pred.time_breakdown_s.values()) == pytest.approx(pred.step_time_s)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_zero_with_ep_memory_paths_agree(graph, node, zero):
    # the partition DP's vector and matrix forms price the expert shard as stage_memory does
    c = CostConstants(optimizer_temp_bytes_per_param=400.0)  # the optimizer temporaries bind for some stages
    cfg = ParallelConfig(dp=4, tp=2, pp=2, micro_batch_size=2, num_micro_batches=4, ep=2, zero_stage=zero)
    table = layer_table(graph, node, micro_batch=2, tp=2, sequence_parallel=False, recompute="none", c=c,
                        knobs=TableKnobs(ep=2))
    flights = [2.0, 1.0]
    vec = stage_memory_vec(table, cfg, c, p=2, in_flight=flights)
    mat = stage_memory_matrix(table, cfg, c, p=2, in_flight=flights)
    n = graph.num_layers
    for k in range(2):
        for i in range(n):
            for j in range(i + 1, n + 1):
                ref = stage_memory(table, [(i, j)], in_flight=flights[k], cfg=cfg, c=c, is_last=(k == 1)).total
                assert vec(j, k)[i] == pytest.approx(ref, rel=1e-9)
                assert mat(k)[i, j] == pytest.approx(ref, rel=1e-9)
    o_b = c.state_bytes(graph.dtype)[2]
    experts = float(table.expert_params.sum())
    mine = stage_memory(table, [(0, n)], in_flight=1.0, cfg=cfg, c=c, is_last=True)
    by_hand = o_b * (stage_params(table, 0, n) - experts) / 4 / 2 + o_b * experts / 2 / 2  # shard 4 or 2, tp 2
    assert mine.optimizer == pytest.approx(by_hand, rel=1e-12)


def test_ep_options(graph):
    assert ep_options(graph, 8, SearchSpace()) == (1, 2, 4)  # divides dp and the 4 experts
    assert ep_options(graph, 2, SearchSpace()) == (1, 2)
    assert ep_options(trace_preset("llama-tiny"), 8, SearchSpace()) == (1,)


def test_search_picks_ep_when_memory_needs_it():
    # Mixtral 8x7B on 4 nodes with neither pipelining nor ZeRO: tp=8 leaves 93 GB of state per
    # device (tp=16 across two nodes would halve it: not allowed here); only splitting the experts
    # over the data-parallel ranks fits in 80 GB.
    space = SearchSpace(tp=(8,), pp=(1,), zero_stage=(0,))
    chosen = plan("mixtral-8x7b", "dgx-h100", nodes=4, global_batch=64, space=space, baselines=False)
    assert chosen.parallel.ep > 1 and chosen.parallel.tp == 8 and chosen.predicted.peak_memory_bytes < 80e9
    assert any("all-to-alls take" in line for line in chosen.explanation)
    with pytest.raises(InfeasibleError):
        plan("mixtral-8x7b", "dgx-h100", nodes=4, global_batch=64, baselines=False,
             space=SearchSpace(tp=(8,), pp=(1,), zero_stage=(0,), ep=(1,)))


def test_a_presets_plan_keeps_to_what_the_runtime_runs_with_experts():
    from planner.space import unrunnable_combination
    assert "--zero 1" in unrunnable_combination(ParallelConfig(dp=2, ep=2, zero_stage=3))
    assert "--ep 1" in unrunnable_combination(ParallelConfig(dp=2, tp=2, ep=2, sequence_parallel=True))
    assert unrunnable_combination(ParallelConfig(dp=2, ep=2, zero_stage=1)) is None
    assert unrunnable_combination(ParallelConfig(dp=2, zero_stage=3)) is None
    # ZeRO-3 and sequence parallelism on offer: the preset's plan splits the experts without either
    chosen = plan("mixtral-8x7b", "dgx-h100", nodes=4, global_batch=64, baselines=False,
                  space=SearchSpace(tp=(8,), pp=(1,), zero_stage=(0, 3), ep=(2, 4)))
    assert chosen.parallel.ep > 1 and unrunnable_combination(chosen.parallel) is None


def test_hugging_face_mixtral_experts_are_found():
    transformers = pytest.importorskip("transformers")
    import torch

    from planner.trace.assemble import expert_routing

    cfg = transformers.MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, num_local_experts=4, vocab_size=128)
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(cfg)
    (r,) = expert_routing(model.model.layers[0])
    assert (r.num_experts, r.top_k, r.hidden, r.expert_params) == (4, 2, 64, 4 * 3 * 64 * 32)


@pytest.mark.parametrize("name, published, moe_layers", [("mixtral-8x7b", 46.7e9, 32), ("deepseek-v3", 671e9, 58)])
def test_presets_trace_to_their_published_size(name, published, moe_layers):
    g = trace_preset(name)
    assert abs(g.param_count / published - 1) < 0.01, g.param_count
    assert sum(1 for layer in g.layers if layer.experts) == moe_layers
    if name == "deepseek-v3":  # 256 routed experts of 3 x 7168 x 2048; the shared expert stays out of the split
        r = next(layer for layer in g.layers if layer.experts).experts[0]
        assert (r.num_experts, r.top_k, r.expert_params) == (256, 8, 256 * 3 * 7168 * 2048)


def test_asking_ep_of_a_dense_model_is_an_error_naming_ep():
    from planner.api import plan
    from planner.errors import SpecError
    from planner.space import SearchSpace

    with pytest.raises(SpecError, match="ep: got 2; gpt-tiny has no mixture-of-experts layer"):
        plan("gpt-tiny", "cpu-local", devices_per_node=2, global_batch=8, space=SearchSpace(ep=(2,)))
