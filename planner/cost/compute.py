"""Compute time of a layer: a roofline per op with a GEMM efficiency that depends on shape.

``time = max(flops / (peak * eff(m, n, k)), bytes / (bandwidth * bw_eff))`` per op. The GEMM
efficiency ``eff = eff_max * Π d / (d + d_half)`` over its three dims: a GEMM is fast only when
every dim fills the tensor-core tiles. Per-sample op costs from the trace are scaled by the
micro-batch (``m`` and bytes grow with it) and split by tensor parallelism (``n`` or ``k``).
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.cluster import DeviceSpec
from planner.cost.constants import CostConstants
from planner.trace.graph import Layer


def gemm_efficiency(m: float, n: float, k: float, c: CostConstants) -> float:
    eff = c.gemm_efficiency_max
    for d in (m, n, k):
        if d > 0:
            eff *= d / (d + c.gemm_half_efficiency_dim)
    return eff


@dataclass(frozen=True)
class LayerTimes:
    """Per micro-batch seconds on one device: forward, backward-input, backward-weight."""

    fwd_s: float
    bwd_input_s: float
    bwd_weight_s: float
    attention_fwd_s: float  # the part selective recomputation repeats

    @property
    def bwd_s(self) -> float:
        return self.bwd_input_s + self.bwd_weight_s


def layer_times(layer: Layer, *, micro_batch: int, tp: int, sequence_parallel: bool, device: DeviceSpec,
                dtype: str, c: CostConstants) -> LayerTimes:
    """Seconds for one micro-batch of ``layer`` on one of its ``tp`` devices."""
    peak = device.peak(dtype)
    bw = device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
    gemm_fwd = 0.0
    attention = 0.0
    gemm_flops = 0.0
    for op in layer.op_costs:
        if op.flops <= 0:
            continue
        flops = op.flops * micro_batch / tp
        eff = gemm_efficiency(op.m * micro_batch, max(op.n / tp, 1.0), op.k, c) if op.m else c.gemm_efficiency_max
        t = max(flops / (peak * eff), op.bytes * micro_batch / tp / bw) + c.kernel_overhead_s
        gemm_fwd += t
        gemm_flops += op.flops
        if op.kind in ("bmm", "baddbmm"):
            attention += t
    mem_bytes = sum(op.bytes for op in layer.op_costs if op.flops <= 0) * micro_batch
    if sequence_parallel or layer.activation_bytes <= 0:
        shard = 1.0 / tp
    else:
        replicated = min(1.0, layer.replicated_activation_bytes / layer.activation_bytes)
        shard = replicated + (1.0 - replicated) / tp
    mem_fwd = mem_bytes * shard / bw
    fwd = gemm_fwd + mem_fwd
    if gemm_flops > 0:
        b_ratio = layer.bwd_input_flops / gemm_flops
        w_ratio = layer.bwd_weight_flops / gemm_flops
    else:
        b_ratio, w_ratio = 1.0, 0.0
    # Backward of memory-bound ops reads the saved input and the incoming gradient and writes one:
    # about twice the forward traffic.
    return LayerTimes(fwd_s=fwd, bwd_input_s=gemm_fwd * b_ratio + 2 * mem_fwd, bwd_weight_s=gemm_fwd * w_ratio,
                      attention_fwd_s=attention)
