"""HSDP, reshard after forward, FP8 and recompute every k-th layer (planner/cost/sharding.py, fp8.py):
the defaults price as before, and each knob moves time and memory by the formula written by hand."""

from dataclasses import replace

import numpy as np
import pytest

from planner.cluster import ClusterSpec
from planner.cost.calibrate import gpt_graph
from planner.cost.comm import all_gather_s, all_reduce_s, reduce_scatter_s, strided_group
from planner.cost.compute import LINEAR_KINDS, layer_times
from planner.cost.constants import CostConstants, trainer_constants
from planner.cost.fp8 import FP8_CAST_BYTES_PER_ELEMENT, cast_s
from planner.cost.layer_table import TableKnobs
from planner.cost.memory import device_params
from planner.cost.model import evaluate, layer_table
from planner.cost.sharding import recomputes_layer, shard_groups, zero3_micro_batch_s
from planner.errors import SpecError
from planner.plan import ParallelConfig
from planner.resolve import check_config
from planner.space import SearchSpace, fp8_options, recompute_every_options, reshard_options, shard_options

C = CostConstants()
NO_OVERLAP = replace(C, comm_compute_overlap=0.0, fsdp_layer_overhead_s=0.0)  # exposed = what the formula says


@pytest.fixture(scope="module")
def graph():
    return gpt_graph(16, 2048, 8, seq_len=2048, vocab=8192)  # embed, 8 blocks, head


def _evaluate(graph, cfg, cluster, c=C):
    table = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                        sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c,
                        knobs=TableKnobs.of(cfg))
    return table, evaluate(graph, cluster, cfg, [(0, graph.num_layers)], c, table=table)


def _zero3(**kw):
    return ParallelConfig(**{**dict(dp=16, tp=2, pp=1, micro_batch_size=1, num_micro_batches=4, zero_stage=3), **kw})


def test_defaults_price_as_before(graph):
    """dp_shard = dp is the default's one shard group; both price to the same bits, on today's dp group."""
    cluster = ClusterSpec.preset("dgx-h100", nodes=4)
    for zero in (0, 1, 2, 3):
        cfg = _zero3(zero_stage=zero)
        assert shard_groups(cluster, cfg).shard == strided_group(cluster, cfg.dp, cfg.tp)
        assert shard_groups(cluster, cfg).replicate is None
        a = _evaluate(graph, cfg, cluster)[1]
        b = _evaluate(graph, replace(cfg, dp_shard=cfg.dp), cluster)[1]
        assert a.step_time_s == b.step_time_s and a.memory_per_device == b.memory_per_device
    # ZeRO-3 state: w/dp, g/dp, o/dp per parameter (16 bytes: 2 + 2 + 12), split tp ways
    table, pred = _evaluate(graph, _zero3(), cluster)
    params = device_params(table, [(0, graph.num_layers)])
    mem = pred.memory_per_device[0]
    assert mem.weights == pytest.approx(2 * params / 16 / 2, rel=1e-12)
    assert mem.optimizer == pytest.approx(12 * params / 16 / 2, rel=1e-12)


def test_hsdp_divides_state_by_the_shard_group_and_reduces_in_two_levels(graph):
    cluster = ClusterSpec.preset("dgx-h100", nodes=4)  # 32 devices: tp 2 x dp 16; a shard of 4 is one node
    full, hsdp = _zero3(), _zero3(dp_shard=4)
    table, p_full = _evaluate(graph, full, cluster, NO_OVERLAP)
    _, p_hsdp = _evaluate(graph, hsdp, cluster, NO_OVERLAP)
    params = device_params(table, [(0, graph.num_layers)]) / 2  # per tp rank
    w, g, o = C.state_bytes("bf16")
    m_full, m_hsdp = p_full.memory_per_device[0], p_hsdp.memory_per_device[0]
    assert m_hsdp.weights == pytest.approx(w * params / 4, rel=1e-12)
    assert m_hsdp.gradients == pytest.approx(g * params / 4, rel=1e-12)
    assert m_hsdp.optimizer == pytest.approx(o * params / 4, rel=1e-12)
    assert m_hsdp.optimizer == pytest.approx(4 * m_full.optimizer, rel=1e-12)  # 1/4 instead of 1/16
    # by hand: gathers and reduce-scatter over the 4 dp ranks of one node (stride tp = 2), then the
    # gradient shard (1/4) all-reduced over the 4 replicas (stride tp x 4 = 8: one per node)
    shard, replicas = strided_group(cluster, 4, 2), strided_group(cluster, 4, 8)
    assert (shard.nodes, replicas.nodes) == (1, 4)
    per_mb = 2 * all_gather_s(w * params, shard, C) + reduce_scatter_s(g * params, shard, C) \
        + all_reduce_s(g * params / 4, replicas, C)
    groups = shard_groups(cluster, hsdp)
    assert zero3_micro_batch_s(w * params, g * params, groups, hsdp, C) == pytest.approx(per_mb, rel=1e-12)
    m = hsdp.num_micro_batches
    assert p_hsdp.time_breakdown_s["zero3_gather_exposed"] == pytest.approx(m * per_mb, rel=1e-12)
    # the in-node gathers beat the 16-rank ones across 4 nodes; the replicas' all-reduce is the price
    assert all_gather_s(w * params, shard, C) < all_gather_s(w * params, strided_group(cluster, 16, 2), C)


def test_keeping_the_gathered_weights_saves_one_gather_for_their_memory(graph):
    cluster = ClusterSpec.preset("dgx-h100", nodes=4)
    table, p_re = _evaluate(graph, _zero3(), cluster, NO_OVERLAP)
    _, p_keep = _evaluate(graph, _zero3(reshard_after_forward=False), cluster, NO_OVERLAP)
    params = device_params(table, [(0, graph.num_layers)]) / 2
    w, g, _ = C.state_bytes("bf16")
    one_gather = all_gather_s(w * params, strided_group(cluster, 16, 2), C)
    saved = p_re.time_breakdown_s["zero3_gather_exposed"] - p_keep.time_breakdown_s["zero3_gather_exposed"]
    assert saved == pytest.approx(4 * one_gather, rel=1e-9)  # one all-gather less in each of 4 micro-batches
    re, keep = p_re.memory_per_device[0], p_keep.memory_per_device[0]
    assert keep.weights - re.weights == pytest.approx(w * params, rel=1e-12)  # the whole stage, gathered
    largest = float(table.params.max()) / 2
    assert re.temporary - keep.temporary == pytest.approx(2 * w * largest, rel=1e-9)  # no per-layer copies
    assert keep.total > re.total


def test_fsdp_mixed_precision_stores_fp32_shards_and_gathers_bf16(graph):
    """torch FSDP's param dtype: fp32 shards (4 + 4 + 8 bytes), bf16 gathers, gathered copies and held weights."""
    cluster = ClusterSpec.preset("dgx-h100", nodes=4)
    fp32 = replace(NO_OVERLAP, weight_bytes=4, grad_bytes=4, bf16_grad_bytes=4, optimizer_bytes=8)
    mixed = replace(fp32, fsdp_param_bytes=2.0)
    assert (fp32.gathered_weight_bytes("bf16"), mixed.gathered_weight_bytes("bf16")) == (4.0, 2.0)
    for cfg in (_zero3(), _zero3(reshard_after_forward=False)):
        table, p32 = _evaluate(graph, cfg, cluster, fp32)
        _, pmix = _evaluate(graph, cfg, cluster, mixed)
        params = device_params(table, [(0, graph.num_layers)]) / 2
        a, b = p32.memory_per_device[0], pmix.memory_per_device[0]
        assert (a.gradients, a.optimizer) == (b.gradients, b.optimizer)  # the shards are fp32 either way
        held = 0.0 if cfg.reshard_after_forward else params * (4 - 2)  # the stage's gathered weights
        assert a.weights - b.weights == pytest.approx(held, rel=1e-12)
        largest = float(table.params.max()) / 2
        copies = 2 * (4 - 2) * largest if cfg.reshard_after_forward else 0.0
        assert a.temporary - b.temporary == pytest.approx(copies, rel=1e-9)
        gathers = 2 if cfg.reshard_after_forward else 1
        group = strided_group(cluster, 16, 2)
        one = all_gather_s(4 * params, group, fp32) - all_gather_s(2 * params, group, fp32)
        saved = p32.time_breakdown_s["zero3_gather_exposed"] - pmix.time_breakdown_s["zero3_gather_exposed"]
        assert saved == pytest.approx(cfg.num_micro_batches * gathers * one, rel=1e-9)
    # ZeRO-1: no gathered copies, nothing changes
    z1 = _zero3(zero_stage=1)
    assert _evaluate(graph, z1, cluster, fp32)[1].step_time_s == _evaluate(graph, z1, cluster, mixed)[1].step_time_s


def test_fp8_is_faster_on_h100_and_refused_on_a100(graph):
    h100 = ClusterSpec.preset("dgx-h100", nodes=1)
    block = graph.layers[1]
    bf16 = layer_times(block, micro_batch=4, tp=1, sequence_parallel=False, device=h100.device, dtype="bf16", c=C)
    fp8 = layer_times(block, micro_batch=4, tp=1, sequence_parallel=False, device=h100.device, dtype="bf16", c=C,
                      fp8=True)
    assert fp8.fwd_s < bf16.fwd_s and fp8.bwd_s < bf16.bwd_s
    bw = h100.device.memory_bandwidth_bytes_per_s * C.memory_bandwidth_efficiency
    linears = [op for op in block.op_costs if op.kind in LINEAR_KINDS and op.m]
    assert len(linears) == 4  # qkv, proj, fc1, fc2
    by_hand = FP8_CAST_BYTES_PER_ELEMENT * sum(4 * op.m * op.k + op.k * op.n for op in linears) / bw
    compiled = trainer_constants("compiled")  # torchao under torch.compile: read bf16, write fp8
    assert compiled.fp8_cast_bytes_per_element == FP8_CAST_BYTES_PER_ELEMENT
    assert cast_s(block, micro_batch=4, tp=1, device=h100.device, c=compiled, linear_kinds=LINEAR_KINDS)[0] == \
        pytest.approx(by_hand, rel=1e-12)
    # Transformer Engine (the defaults: Megatron-LM) fuses the casts; eager torchao reads the input once more
    assert cast_s(block, micro_batch=4, tp=1, device=h100.device, c=C, linear_kinds=LINEAR_KINDS) == (0.0, 0.0)
    eager = trainer_constants("eager")
    assert cast_s(block, micro_batch=4, tp=1, device=h100.device, c=eager, linear_kinds=LINEAR_KINDS)[0] == \
        pytest.approx(by_hand * 5 / 3 * C.memory_bandwidth_efficiency / eager.memory_bandwidth_efficiency, rel=1e-12)
    cfg = ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=4, num_micro_batches=1)
    t_bf16 = _evaluate(graph, cfg, h100)[1]
    t_fp8 = _evaluate(graph, replace(cfg, fp8=True), h100)[1]
    assert t_fp8.step_time_s < 0.95 * t_bf16.step_time_s  # this small model spends half its forward in attention
    # Transformer Engine (the defaults) keeps FP8 copies of its linears' inputs: half their bf16 bytes, the
    # attention output (which attention saves as well) an FP8 copy more; torchao keeps the bf16 inputs.
    assert graph.layers[1].linear_input_bytes > 0
    saved = sum(layer.linear_input_bytes - layer.linear_shared_input_bytes  # 4 samples; the head stays bf16
                for layer in graph.layers[:-1]) / 2 * 4
    assert t_bf16.memory_per_device[0].activations - t_fp8.memory_per_device[0].activations == \
        pytest.approx(saved, rel=1e-9)
    torchao = trainer_constants("compiled")
    assert _evaluate(graph, replace(cfg, fp8=True), h100, c=torchao)[1].memory_per_device == \
        _evaluate(graph, cfg, h100, c=torchao)[1].memory_per_device
    head = graph.layers[-1]  # the output head stays in bf16
    table = layer_table(graph, h100, micro_batch=4, tp=1, sequence_parallel=False, recompute="none", c=C,
                        knobs=TableKnobs(fp8=True))
    plain = layer_table(graph, h100, micro_batch=4, tp=1, sequence_parallel=False, recompute="none", c=C)
    assert head is graph.layers[-1] and table.fwd_s[-1] == plain.fwd_s[-1] and table.fwd_s[1] < plain.fwd_s[1]
    assert fp8_options(h100, SearchSpace()) == (False, True)
    a100 = ClusterSpec.preset("dgx-a100-80g", nodes=1)
    assert fp8_options(a100, SearchSpace()) == (False,)
    with pytest.raises(SpecError) as err:
        check_config(replace(cfg, fp8=True), graph, a100)
    assert err.value.field == "fp8" and "A100" in str(err.value)
    with pytest.raises(SpecError, match="fp8"):
        fp8_options(a100, SearchSpace(fp8=(True,)))


def test_recompute_every_two_stores_half_the_layers(graph):
    cluster = ClusterSpec.preset("dgx-h100", nodes=1)
    kw = dict(micro_batch=2, tp=1, sequence_parallel=False, c=C)
    full = layer_table(graph, cluster, recompute="full", **kw)
    none = layer_table(graph, cluster, recompute="none", **kw)
    half = layer_table(graph, cluster, recompute="full", knobs=TableKnobs(recompute_every=2), **kw)
    n = graph.num_layers
    recomputed = [i for i in range(n) if recomputes_layer(i, 2)]
    assert recomputed == list(range(1, n, 2))  # layers 1, 3, 5, ...: torchtitan's every-k-th counter
    kept = [i for i in range(n) if i not in recomputed]
    assert np.array_equal(half.stored_act_bytes[recomputed], full.stored_act_bytes[recomputed])
    assert np.array_equal(half.stored_act_bytes[kept], none.stored_act_bytes[kept])
    assert np.all(half.recompute_s[kept] == 0) and np.all(half.recompute_s[recomputed] > 0)
    blocks = range(1, n - 1)  # the transformer blocks: half of them checkpointed
    assert sum(recomputes_layer(i, 2) for i in blocks) == len(blocks) // 2
    assert full.stored_act_bytes.sum() < half.stored_act_bytes.sum() < none.stored_act_bytes.sum()
    assert full.recompute_s.sum() > half.recompute_s.sum() > 0


def test_search_options():
    cluster = ClusterSpec.preset("dgx-h100", nodes=16)
    space = SearchSpace()
    assert shard_options(64, 3, cluster, space, dp_stride=2) == (None, 4, 16)  # one node's 4 dp ranks, x4
    assert shard_options(64, 2, cluster, space, dp_stride=2) == (None,)
    assert shard_options(64, 3, cluster, SearchSpace(dp_shard=(8,))) == (8,)
    assert reshard_options(3, space) == (True, False) and reshard_options(1, space) == (True,)
    assert recompute_every_options("full", space) == (1, 2, 4)
    assert recompute_every_options("selective", space) == (1,)


@pytest.mark.parametrize("knobs", [dict(dp_shard=4), dict(reshard_after_forward=False),
                                   dict(dp_shard=4, reshard_after_forward=False)])
def test_the_three_memory_paths_agree(graph, knobs):
    """stage_memory, the partition DP's vector and matrix forms: the same bytes with HSDP and no-reshard."""
    from planner.cost.memory import stage_memory, stage_memory_matrix, stage_memory_vec

    cfg = _zero3(**knobs)
    cluster = ClusterSpec.preset("dgx-h100", nodes=4)
    table = layer_table(graph, cluster, micro_batch=1, tp=2, sequence_parallel=False, recompute="full", c=C)
    n = graph.num_layers
    for a, b in [(0, n), (1, 5), (3, n)]:
        one = stage_memory(table, [(a, b)], in_flight=2.0, cfg=cfg, c=C, is_last=b == n).total
        assert stage_memory_matrix(table, cfg, C, p=2, in_flight=[2.0, 2.0])(1 if b == n else 0)[a, b] == \
            pytest.approx(one, rel=1e-12)
        assert stage_memory_vec(table, cfg, C, p=2, in_flight=[2.0, 2.0])(b, 1 if b == n else 0)[a] == \
            pytest.approx(one, rel=1e-12)


def test_cli_flags_reach_the_configuration_and_name_their_errors(capsys):
    from planner.cli import main

    base = ["evaluate", "--model", "gpt3-1.3b", "--cluster", "dgx-h100", "--nodes", "1", "--global-batch", "32",
            "--tp", "1", "--pp", "1", "--dp", "8", "--micro-batch", "2"]
    code = main([*base, "--zero", "3", "--dp-shard", "4", "--no-reshard-after-forward", "--fp8",
                 "--recompute", "full", "--recompute-every", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "hsdp=2x4, no-reshard, fp8" in out and "recompute=full/2" in out
    code = main([*base, "--zero", "1", "--dp-shard", "3", "--recompute", "selective", "--recompute-every", "2"])
    err = capsys.readouterr().err
    assert code == 2
    for flag in ("--dp-shard: got 3; HSDP shards parameters", "--dp-shard: got 3; the shard group size must divide",
                 "--recompute-every: got 2"):
        assert flag in err, err


def test_an_fp8_plan_says_the_numerics_change():
    from planner.api import evaluate

    p = evaluate("gpt-tiny", "dgx-h100", ParallelConfig(dp=8, micro_batch_size=1, num_micro_batches=1, fp8=True))
    (line,) = [e for e in p.explanation if e.startswith("FP8:")]
    assert "1979 TFLOP/s" in line and "--no-fp8" in line


def _pipelined(graph, cluster, cfg, c=NO_OVERLAP):
    """Evaluate a two-stage pipeline cut in the middle of ``graph``'s layers."""
    table = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                        sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c,
                        knobs=TableKnobs.of(cfg))
    half = graph.num_layers // 2
    return table, evaluate(graph, cluster, cfg, [(0, half), (half, graph.num_layers)], c, table=table)


@pytest.mark.parametrize("reshard", [False, True])
def test_zero3_under_a_pipeline_gathers_per_step_and_keeps_unsharded_gradients(graph, reshard):
    """torch's pipelining turns off FSDP2's reshard after backward and its gradient sync for every
    micro-batch and reduce-scatters once after the last backward (torch/distributed/pipelining/stage.py):
    one gather per step (``m + 1`` with reshard after forward), one reduce-scatter, and the gathered
    weights and full gradients held."""
    cluster = ClusterSpec.preset("dgx-h100", nodes=4)  # 32 devices: pp 2 x dp 8 x tp 2
    w, g, _ = C.state_bytes("bf16")
    exposed, mems = {}, {}
    for m in (4, 8):
        cfg = _zero3(dp=8, pp=2, num_micro_batches=m, reshard_after_forward=reshard)
        table, pred = _pipelined(graph, cluster, cfg)
        exposed[m] = pred.time_breakdown_s["zero3_gather_exposed"]
        mems[m] = pred.memory_per_device
    chunks = [(0, graph.num_layers // 2), (graph.num_layers // 2, graph.num_layers)]
    params = [device_params(table, [ch]) / 2 for ch in chunks]  # per tp rank, per pipeline device
    group = strided_group(cluster, 8, 2)
    by_hand = {m: max((1 + (m if reshard else 0)) * all_gather_s(w * p, group, C) + reduce_scatter_s(g * p, group, C)
                      for p in params) for m in (4, 8)}
    assert exposed == pytest.approx(by_hand, rel=1e-9)
    if not reshard:
        assert exposed[4] == pytest.approx(exposed[8], rel=1e-12)  # not per micro-batch: once per step
    for d, p in enumerate(params):
        assert mems[4][d].gradients == pytest.approx(g * p, rel=1e-12)  # unsharded until the step's end
        assert mems[4][d].weights == pytest.approx(w * p / 8 + w * p, rel=1e-12)  # shard + the gathered stage
    # without a pipeline the same ZeRO-3 reduce-scatters every micro-batch and shards the gradients
    flat = _evaluate(graph, _zero3(dp=8, reshard_after_forward=reshard), ClusterSpec.preset("dgx-h100", nodes=2),
                     NO_OVERLAP)[1]
    whole = device_params(table, [(0, graph.num_layers)]) / 2
    assert flat.memory_per_device[0].gradients == pytest.approx(g * whole / 8, rel=1e-12)
