"""Device-specific kernel efficiencies, tensor-parallel and parameter-gather overlap, gradient accumulation.

Each effect is checked by the number it must move (and by what it must not move).
"""

import dataclasses
import json

import pytest

from planner.cluster import ClusterSpec, DeviceSpec
from planner.cost.calibrate import gpt_graph, megatron_boundaries
from planner.cost.compute import layer_times
from planner.cost.constants import CostConstants, trainer_constants
from planner.cost.model import evaluate, layer_table
from planner.errors import SpecError
from planner.plan import ParallelConfig

C = CostConstants()


@pytest.fixture(scope="module")
def graph():
    return gpt_graph(16, 1024, 8, seq_len=512, vocab=8192)


def _predict(graph, cfg, c=C, cluster=None):
    cluster = cluster or ClusterSpec.preset("dgx-a100-80g", nodes=2)
    table = layer_table(graph, cluster, micro_batch=cfg.micro_batch_size, tp=cfg.tp,
                        sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute, c=c)
    bounds = megatron_boundaries(graph.num_layers, cfg.pp) if cfg.pp > 1 else [(0, graph.num_layers)]
    return table, evaluate(graph, cluster, cfg, bounds, c, table=table)


def test_device_efficiencies_round_trip_and_are_checked():
    d = ClusterSpec.preset("dgx-a100-80g").to_dict()
    assert "gemm_efficiency" not in d["device"]  # absent unless stated: old cluster files read the same
    d["device"]["gemm_efficiency"] = 0.7
    d["device"]["fused_attention_efficiency"] = 0.35
    spec = ClusterSpec.from_dict(d)
    assert (spec.device.gemm_efficiency, spec.device.fused_attention_efficiency) == (0.7, 0.35)
    assert ClusterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).device == spec.device
    for bad in (0, 1.5, "0.7", True):
        d["device"]["gemm_efficiency"] = bad
        with pytest.raises(SpecError) as err:
            ClusterSpec.from_dict(d)
        assert "gemm_efficiency" in err.value.field


def test_a_device_with_its_own_gemm_efficiency_is_slower_in_proportion(graph):
    dev = ClusterSpec.preset("dgx-a100-80g").device
    own = dataclasses.replace(dev, gemm_efficiency=C.gemm_efficiency_max / 2)
    block = graph.layers[1]
    kw = dict(micro_batch=8, tp=1, sequence_parallel=False, dtype="bf16", c=C)
    base, slow = layer_times(block, device=dev, **kw), layer_times(block, device=own, **kw)
    # the weight gradient is GEMMs only: half the efficiency, about twice the time; the forward also
    # holds memory-bound ops, which do not move
    assert 1.8 < slow.bwd_weight_s / base.bwd_weight_s <= 2.0 + 1e-9
    assert 1.3 < slow.fwd_s / base.fwd_s < slow.bwd_weight_s / base.bwd_weight_s
    # The same value as the constant prices exactly the same
    same = dataclasses.replace(dev, gemm_efficiency=C.gemm_efficiency_max)
    assert layer_times(block, device=same, **kw) == base


def test_h100_preset_states_its_fused_attention_efficiency():
    dev = ClusterSpec.preset("dgx-h100").device
    assert dev.fused_attention_efficiency is not None and dev.fused_attention_efficiency < C.fused_attention_efficiency
    assert dev.gemm_efficiency is not None and dev.gemm_efficiency < C.gemm_efficiency_max


def test_a_device_states_how_its_gemm_efficiency_falls_with_the_shape():
    from planner.cost.compute import device_constants, gemm_efficiency

    d = ClusterSpec.preset("dgx-a100-80g").to_dict()
    assert "gemm_half_efficiency_dim" not in d["device"]  # absent unless stated: the constant's 96
    d["device"]["gemm_half_efficiency_dim"] = 192
    spec = ClusterSpec.from_dict(d)
    assert spec.device.gemm_half_efficiency_dim == 192
    assert ClusterSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).device == spec.device
    for bad in (0, -5, "192", True):
        d["device"]["gemm_half_efficiency_dim"] = bad
        with pytest.raises(SpecError) as err:
            ClusterSpec.from_dict(d)
        assert err.value.field == "device.gemm_half_efficiency_dim"
    # a dimension no GEMM could pass is implausible, named by field (a slip, or exotic hardware: --i-know)
    d["device"]["gemm_half_efficiency_dim"] = 1e6
    with pytest.raises(SpecError) as err:
        ClusterSpec.from_dict(d)
    assert err.value.field == "device.gemm_half_efficiency_dim" and "plausible" in str(err.value)
    # the H100 presets: the A100's 96 scaled by the roofline's ridge (peak over memory bandwidth)
    h100, a100 = ClusterSpec.preset("dgx-h100").device, ClusterSpec.preset("dgx-a100-80g").device
    ridge = (h100.peak("bf16") / h100.memory_bandwidth_bytes_per_s) / (a100.peak("bf16") / a100.memory_bandwidth_bytes_per_s)
    assert h100.gemm_half_efficiency_dim == pytest.approx(C.gemm_half_efficiency_dim * ridge, abs=1)
    c = device_constants(h100, C)
    # a thin tensor-parallel shard loses more of the device's efficiency than a large GEMM does
    big, thin = gemm_efficiency(16384, 8192, 8192, c), gemm_efficiency(4096, 256, 2048, c)
    assert big > 0.9 * c.gemm_efficiency_max
    assert thin / big < gemm_efficiency(4096, 256, 2048, C) / gemm_efficiency(16384, 8192, 8192, C)


def test_tp_comm_overlap_hides_tp_communication_up_to_the_gemm_time(graph):
    cfg = ParallelConfig(dp=2, tp=8, pp=1, micro_batch_size=2, num_micro_batches=4)
    _, base = _predict(graph, cfg)
    _, half = _predict(graph, cfg, dataclasses.replace(C, tp_comm_overlap=0.5))
    _, full = _predict(graph, cfg, dataclasses.replace(C, tp_comm_overlap=1.0))
    tc = base.time_breakdown_s["tp_comm"]
    assert tc > 0
    assert half.time_breakdown_s["tp_comm"] == pytest.approx(tc / 2, rel=1e-6)
    assert 0 <= full.time_breakdown_s["tp_comm"] < half.time_breakdown_s["tp_comm"]
    assert full.time_breakdown_s["compute"] == pytest.approx(base.time_breakdown_s["compute"])
    # on a slow network the collectives outlast the GEMMs: what is left exposed is what they do not cover
    slow = ClusterSpec.preset("dgx-a100-80g", nodes=2)
    slow = dataclasses.replace(slow, groups=tuple(dataclasses.replace(
        g, intra_node=dataclasses.replace(g.intra_node, bandwidth_bytes_per_s=1e9)) for g in slow.groups))
    _, s_base = _predict(graph, cfg, cluster=slow)
    _, s_full = _predict(graph, cfg, dataclasses.replace(C, tp_comm_overlap=1.0), cluster=slow)
    assert s_full.time_breakdown_s["tp_comm"] == pytest.approx(
        s_base.time_breakdown_s["tp_comm"] - s_base.time_breakdown_s["compute"], rel=0.05)


def test_overlap_param_gather_hides_the_zero1_gather_behind_the_first_forward(graph):
    cfg = ParallelConfig(dp=16, tp=1, pp=1, micro_batch_size=2, num_micro_batches=2, zero_stage=1)
    _, base = _predict(graph, cfg)
    _, over = _predict(graph, cfg, dataclasses.replace(C, overlap_param_gather=True))
    assert over.time_breakdown_s["dp_comm_exposed"] < base.time_breakdown_s["dp_comm_exposed"]
    z0 = dataclasses.replace(cfg, zero_stage=0)  # nothing to gather without ZeRO: no change
    assert _predict(graph, z0, dataclasses.replace(C, overlap_param_gather=True))[1].step_time_s == \
        _predict(graph, z0)[1].step_time_s


@pytest.mark.parametrize("m", [1, 4])
def test_gradient_accumulation_is_one_memory_pass_per_extra_micro_batch(graph, m):
    cfg = ParallelConfig(dp=2, tp=1, pp=1, micro_batch_size=2, num_micro_batches=m)
    c = trainer_constants("eager")
    assert c.grad_accumulation_bytes_per_param == 12
    table, pred = _predict(graph, cfg, c)
    cluster = ClusterSpec.preset("dgx-a100-80g")
    bw = cluster.device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
    expect = (m - 1) * 12 * float(table.params.sum()) / bw
    assert pred.time_breakdown_s["grad_accumulation"] == pytest.approx(expect, rel=1e-9)
    assert sum(pred.time_breakdown_s.values()) == pytest.approx(pred.step_time_s, rel=1e-9)
    # Megatron's fused accumulation: no such part, and the plan's breakdown keeps its old keys
    assert "grad_accumulation" not in _predict(graph, cfg)[1].time_breakdown_s


def test_the_trainer_s_attention_kernel_is_priced_at_the_device_s_figure_for_it():
    """The megatron trainer runs Transformer Engine's cuDNN attention: on the H100 preset, which states that
    kernel's rate, its fused-attention block is faster than the eager trainer's FlashAttention-2 class; on a
    device that states no such kernel (the A100 preset) both are priced the same."""
    from planner.models import ModelPreset
    from planner.trace import trace_model

    preset = ModelPreset(name="llama-fused", family="llama", config={
        "num_layers": 2, "hidden": 1024, "heads": 8, "ffn_hidden": 2816, "vocab_size": 512, "seq_len": 4096,
        "fused_attention": True})
    block = trace_model(preset.build(device="meta"), preset.sample_input(1, None), dtype="bf16").layers[1]
    h100, a100 = ClusterSpec.preset("dgx-h100").device, ClusterSpec.preset("dgx-a100-80g").device
    assert h100.attention_efficiency("cudnn") > h100.fused_attention_efficiency
    assert a100.attention_efficiency("cudnn") is None and h100.attention_efficiency("") is None
    te, fa2 = trainer_constants("megatron"), trainer_constants("eager")
    assert (te.attention_kernel, fa2.attention_kernel) == ("cudnn", "")

    def fwd(device, c):
        return layer_times(block, micro_batch=1, tp=1, sequence_parallel=False, device=device, dtype="bf16", c=c)

    flash2 = dataclasses.replace(te, attention_kernel="")  # the same trainer, its kernel left out
    assert fwd(h100, te).fwd_s < fwd(h100, flash2).fwd_s
    assert fwd(h100, dataclasses.replace(te, attention_kernel="no-such-kernel")) == fwd(h100, flash2)
    assert fwd(a100, te) == fwd(a100, flash2)


def test_a_device_s_attention_kernels_round_trip_and_are_checked():
    d = ClusterSpec.preset("dgx-h100").to_dict()
    assert d["device"]["attention_kernels"] == {"cudnn": 0.39}
    assert ClusterSpec.from_dict(json.loads(json.dumps(d))).device == ClusterSpec.preset("dgx-h100").device
    for bad in ([0.39], {"cudnn": 0}, {"cudnn": 1.5}, {"cudnn": "0.39"}, {"cudnn": True}):
        d["device"]["attention_kernels"] = bad
        with pytest.raises(SpecError) as err:
            ClusterSpec.from_dict(d)
        assert "attention_kernels" in err.value.field


def test_device_spec_defaults_keep_old_fingerprints():
    dev = DeviceSpec(name="x", peak_flops={"bf16": 1e14}, memory_bytes=2**34, memory_bandwidth_bytes_per_s=1e12)
    assert set(dev.to_dict()) == {"name", "peak_flops", "memory_bytes", "memory_bandwidth_bytes_per_s"}


def test_overlapped_comm_costs_its_compute_a_fraction_of_the_hidden_time():
    from planner.cost.comm import overlapped_comm_s
    slow = dataclasses.replace(C, overlap_compute_slowdown=0.2)
    assert overlapped_comm_s(1.0, 3.0, C) == 0.0  # all hidden, nothing lost
    assert overlapped_comm_s(1.0, 3.0, slow) == pytest.approx(0.2)
    assert overlapped_comm_s(3.0, 1.0, slow) == pytest.approx(2.0 + 0.2)  # 1 s hidden, 2 s exposed
    assert overlapped_comm_s(3.0, 1.0, dataclasses.replace(slow, comm_compute_overlap=0.0)) == 3.0


def test_fsdp_prefetch_pays_the_slowdown_on_what_it_hides(graph):
    cfg = ParallelConfig(dp=16, tp=1, pp=1, micro_batch_size=4, num_micro_batches=2, zero_stage=3)
    _, base = _predict(graph, cfg)
    _, slow = _predict(graph, cfg, dataclasses.replace(C, overlap_compute_slowdown=0.2))
    assert slow.step_time_s > base.step_time_s
    # no background communication on one device: nothing to slow down
    one = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=4, num_micro_batches=2)
    assert _predict(graph, one, dataclasses.replace(C, overlap_compute_slowdown=0.2))[1].step_time_s == \
        _predict(graph, one)[1].step_time_s


def test_the_explanation_names_the_attention_kernel_it_priced():
    """A fused-attention model planned for the megatron trainer on the H100 preset says which kernel's rate
    priced its attention; the eager trainer (FlashAttention-2 class) and a model without fused attention
    get no such line."""
    from planner.api import evaluate

    cfg = ParallelConfig(dp=8, micro_batch_size=1, num_micro_batches=1)

    def lines(model, seq_len, trainer):
        plan = evaluate(model, "dgx-h100", cfg, seq_len=seq_len, constants=trainer_constants(trainer))
        return [x for x in plan.explanation if x.startswith("Attention:")]

    stretched = 64  # beyond llama-tiny's own 32 positions: traced with fused attention
    (line,) = lines("llama-tiny", stretched, "megatron")
    assert "'cudnn'" in line and "39% of peak on H100-SXM5-80GB" in line
    assert lines("llama-tiny", stretched, "eager") == []
    assert lines("gpt-tiny", None, "megatron") == []
