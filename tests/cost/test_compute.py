"""The per-op roofline, the shape-dependent GEMM efficiency, and how tp / micro-batch change them."""

import pytest

from planner.cluster import DeviceSpec
from planner.cost.compute import activation_shard, gemm_efficiency, layer_times, tp_split_dims
from planner.cost.constants import CostConstants
from planner.trace.graph import Layer, OpCost

DEVICE = DeviceSpec(name="dev", peak_flops={"bf16": 100e12}, memory_bytes=2**34, memory_bandwidth_bytes_per_s=1e12)
# No dispatch overhead and full bandwidth so the numbers are the plain roofline.
C = CostConstants(op_dispatch_s=0.0, memory_bandwidth_efficiency=1.0, elementwise_traffic_factor=1.0)


def layer(ops, *, bwd_input=None, bwd_weight=None, act=1000.0, replicated=0.0, attention=0.0, num_ops=0) -> Layer:
    fwd = sum(o.flops for o in ops)
    return Layer(index=0, name="l", module_type="M", signature="s", fwd_flops=fwd,
                 bwd_input_flops=fwd if bwd_input is None else bwd_input,
                 bwd_weight_flops=fwd if bwd_weight is None else bwd_weight, param_count=10,
                 activation_bytes=act, replicated_activation_bytes=replicated, attention_activation_bytes=attention,
                 attention_fwd_flops=0.0, input_bytes=100.0, output_bytes=100.0, op_costs=tuple(ops),
                 num_ops=num_ops)


def gemm(m: int, n: int, k: int, kind: str = "addmm") -> OpCost:
    return OpCost(kind=kind, flops=2.0 * m * n * k, bytes=2.0 * (m * k + k * n + m * n), m=m, n=n, k=k)


def test_gemm_efficiency_is_the_documented_product():
    c = CostConstants()
    assert gemm_efficiency(4096, 4096, 4096, c) == pytest.approx(0.8 * (4096 / 4192) ** 3)
    assert gemm_efficiency(2048, 4608, 12288, c) == pytest.approx(
        0.8 * 2048 / 2144 * 4608 / 4704 * 12288 / 12384)


def test_small_gemms_are_slower_per_flop():
    c = CostConstants()
    effs = [gemm_efficiency(d, d, d, c) for d in (32, 128, 512, 2048, 8192)]
    assert effs == sorted(effs)
    assert effs[0] < 0.03 and effs[-1] > 0.77
    # A thin dim (attention's head dim) costs efficiency even when the others are large.
    assert gemm_efficiency(8192, 8192, 64, c) < 0.5 * gemm_efficiency(8192, 8192, 8192, c)


def test_compute_bound_gemm_uses_peak_times_efficiency():
    op = gemm(1024, 1024, 1024)
    t = layer_times(layer([op]), micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
    expected = op.flops / (100e12 * gemm_efficiency(1024, 1024, 1024, C))
    assert t.fwd_s == pytest.approx(expected)
    assert t.bwd_input_s == pytest.approx(expected)  # backward-input FLOPs = forward FLOPs here
    assert t.bwd_weight_s == pytest.approx(expected)


def test_memory_bound_ops_use_bandwidth():
    mem = OpCost(kind="memory-bound", flops=0.0, bytes=5e9)
    t = layer_times(layer([mem]), micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
    assert t.fwd_s == pytest.approx(5e9 / 1e12)
    assert t.bwd_input_s == pytest.approx(2 * 5e9 / 1e12)  # read saved input + incoming gradient, write one
    fused = CostConstants(op_dispatch_s=0.0, memory_bandwidth_efficiency=0.5, elementwise_traffic_factor=0.25)
    t = layer_times(layer([mem]), micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16",
                    c=fused)
    assert t.fwd_s == pytest.approx(0.25 * 5e9 / 0.5e12)


def test_a_gemm_with_little_work_per_byte_is_memory_bound():
    op = OpCost(kind="mm", flops=2.0 * 4096 * 4096, bytes=2.0 * 2 * 4096 * 4096, m=1, n=4096, k=4096)  # GEMV
    t = layer_times(layer([op]), micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
    assert t.fwd_s == pytest.approx(max(op.bytes / 1e12, op.flops / (100e12 * gemm_efficiency(1, 4096, 4096, C))))
    assert t.fwd_s == pytest.approx(op.bytes / 1e12)


def test_tensor_parallel_splits_flops_and_the_right_dim():
    assert tp_split_dims("addmm", 2048, 49152, 12288, 8) == (2048, 6144, 12288)  # column-parallel: n
    assert tp_split_dims("addmm", 2048, 12288, 49152, 8) == (2048, 12288, 6144)  # row-parallel: k
    assert tp_split_dims("bmm", 196608, 2048, 128, 8) == (24576, 2048, 128)  # attention: heads (in m)
    op = gemm(2048, 8192, 2048)
    one = layer_times(layer([op]), micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
    two = layer_times(layer([op]), micro_batch=1, tp=2, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
    expected = op.flops / 2 / (100e12 * gemm_efficiency(2048, 4096, 2048, C))
    assert two.fwd_s == pytest.approx(expected)
    assert one.fwd_s / 2 < two.fwd_s  # the thinner shard is a little less efficient


def test_bigger_micro_batches_are_more_efficient_per_sample():
    op = gemm(128, 1024, 1024)
    per_sample = []
    for mb in (1, 2, 8, 32):
        t = layer_times(layer([op]), micro_batch=mb, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
        per_sample.append(t.fwd_s / mb)
    assert per_sample == sorted(per_sample, reverse=True)


def test_sequence_parallel_splits_the_replicated_part():
    lay = layer([OpCost(kind="memory-bound", flops=0.0, bytes=8e9)], act=1000.0, replicated=200.0)
    assert activation_shard(lay, 8, False) == pytest.approx(0.2 + 0.8 / 8)
    assert activation_shard(lay, 8, True) == pytest.approx(1 / 8)
    no_sp = layer_times(lay, micro_batch=1, tp=8, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
    sp = layer_times(lay, micro_batch=1, tp=8, sequence_parallel=True, device=DEVICE, dtype="bf16", c=C)
    assert no_sp.fwd_s == pytest.approx(8e9 * 0.3 / 1e12)
    assert sp.fwd_s == pytest.approx(8e9 / 8 / 1e12)


def test_attention_core_is_what_selective_recomputation_repeats():
    bmm = gemm(4096, 512, 64, kind="bmm")
    mem = OpCost(kind="memory-bound", flops=0.0, bytes=1e9)
    lay = layer([gemm(512, 1024, 1024), bmm, mem], act=1000.0, attention=600.0)
    t = layer_times(lay, micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
    bmm_s = bmm.flops / (100e12 * gemm_efficiency(4096, 512, 64, C))
    assert t.attention_fwd_s == pytest.approx(bmm_s + 0.6 * 1e9 / 1e12)
    assert t.attention_fwd_s < t.fwd_s


def test_dispatch_overhead_hides_on_asynchronous_devices_and_adds_on_cpus():
    op = gemm(64, 64, 64)  # microseconds of work
    lay = layer([op], num_ops=100)
    device_s = layer_times(lay, micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16",
                           c=C).fwd_s
    gpu = CostConstants(op_dispatch_s=5e-6, memory_bandwidth_efficiency=1.0, elementwise_traffic_factor=1.0)
    cpu = CostConstants(op_dispatch_s=5e-6, async_dispatch=False, memory_bandwidth_efficiency=1.0,
                        elementwise_traffic_factor=1.0)
    t_gpu = layer_times(lay, micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=gpu)
    t_cpu = layer_times(lay, micro_batch=1, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=cpu)
    assert t_gpu.fwd_s == pytest.approx(max(device_s, 100 * 5e-6))
    assert t_cpu.fwd_s == pytest.approx(device_s + 100 * 5e-6)
    assert t_cpu.bwd_s == pytest.approx(2 * device_s + 2 * 100 * 5e-6)


def test_merged_per_step_gemms_read_their_weight_once_per_step():
    """A recurrent layer's T per-step GEMMs (one merged record) read the weight T times, and that
    traffic does not grow with the micro-batch; only the activations do."""
    steps, m, n, k = 750, 1, 3072, 1024
    one = gemm(m, n, k)
    merged = OpCost(kind="addmm", flops=one.flops * steps, bytes=one.bytes * steps, m=m, n=n, k=k)
    weight, act = 2.0 * k * n, 2.0 * (m * k + m * n)
    for b in (1, 8, 64):
        t = layer_times(layer([merged]), micro_batch=b, tp=1, sequence_parallel=False, device=DEVICE,
                        dtype="bf16", c=C)
        compute = steps * one.flops * b / (100e12 * gemm_efficiency(m * b, n, k, C))
        assert t.fwd_s == pytest.approx(max(compute, steps * (weight + b * act) / 1e12))
        assert t.fwd_s > steps * weight / 1e12
    # An ordinary GEMM is one call: its weight is read once whatever the micro-batch.
    big = gemm(4, 4096, 4096)
    t = layer_times(layer([big]), micro_batch=2, tp=1, sequence_parallel=False, device=DEVICE, dtype="bf16", c=C)
    compute = big.flops * 2 / (100e12 * gemm_efficiency(8, 4096, 4096, C))
    assert t.fwd_s == pytest.approx(max(compute, (2.0 * 4096 * 4096 + 2 * 2.0 * 4 * 8192) / 1e12))
