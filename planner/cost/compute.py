"""Compute time of a layer: a roofline per op, with a GEMM efficiency that depends on shape.

Per op, on one of the ``tp`` devices of a layer, for one micro-batch of ``b`` samples::

    t(op) = max(flops / (peak(dtype) · eff(m, n, k)),  bytes / (bandwidth · bw_eff))

(``bytes``: the traced activation traffic times ``b`` plus the weight read once per kernel: once
for an ordinary GEMM, once per time step for a recurrent layer's merged per-step GEMMs.)

``eff(m, n, k) = eff_max · Π_d d / (d + d_half)``: a GEMM is fast only when every dim fills the
tensor-core tiles and the waves of thread blocks (small micro-batches, attention's head dim and
thin tensor-parallel shards are slower). The trace gives per-sample ``(m, n, k)``; ``m`` scales
with the micro-batch, and tensor parallelism splits a linear's larger output/input dim (Megatron's
column- then row-parallel pairs, a vocabulary-parallel head) and attention's heads (batched ``m``).

Memory-bound ops (everything without FLOPs: norms, softmax, dropout, residual adds, copies) are
one traffic total per layer, scaled by ``elementwise_traffic_factor`` (fused kernels move less
than the traced eager program) and by the tensor-parallel shard: without sequence parallelism
the layer norms and dropouts (``replicated_activation_bytes``) run on the full activation on every
tp rank. Backward: the GEMM time times the layer's backward/forward FLOP ratios (input and weight
gradients separately, so zero-bubble schedules can split them), memory-bound traffic twice the
forward's (read the saved input and the incoming gradient, write the outgoing one).

Host dispatch: ``op_dispatch_s`` per traced op; asynchronous devices hide it behind device time
(``max``), a CPU adds it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from planner.cluster import DeviceSpec, GemmPoint
from planner.cost.constants import DTYPE_BYTES, CostConstants
from planner.cost.fp8 import FP8_GEMM_EFFICIENCY_RATIO, FP8_PEAK, cast_s
from planner.cost.measured import gemm_tables
from planner.trace.graph import Layer
from planner.trace.meter import ATTENTION_KERNELS
from planner.trace.saved_ops import kept_flags

ATTENTION_KINDS = frozenset({"bmm", "baddbmm"}) | ATTENTION_KERNELS
LINEAR_KINDS = frozenset({"addmm", "mm", "linear", "convolution", "_grouped_mm"})


def gemm_efficiency(m: float, n: float, k: float, c: CostConstants) -> float:
    """Fraction of the dtype's peak a GEMM of shape (m, n, k) reaches: eff_max · Π d/(d + d_half)."""
    eff = c.gemm_efficiency_max
    for d in (m, n, k):
        if d > 0:
            eff *= d / (d + c.gemm_half_efficiency_dim)
    return eff


def measured_gemm_efficiency(m: float, n: float, k: float, *, dtype: str, device: DeviceSpec,
                             points: tuple[GemmPoint, ...], c: CostConstants) -> float:
    """:func:`gemm_efficiency` scaled by the measured/formula ratio of the cluster's measured GEMMs of
    ``dtype`` near ``(m, n, k)`` (:mod:`planner.cost.measured`); the formula alone when none is near."""
    eff = gemm_efficiency(m, n, k, c)
    if min(m, n, k) <= 0:
        return eff
    table = gemm_tables(points, tuple(sorted(device.peak_flops.items())), c).get(dtype)
    ratio = table.correction(m, n, k) if table is not None else None
    return eff if ratio is None else eff * ratio


def device_constants(device: DeviceSpec, c: CostConstants) -> CostConstants:
    """``c`` with the device's own sustained GEMM and fused-attention efficiencies and GEMM shape scale,
    where it states them; the attention figure is the one of the trainer's kernel (``c.attention_kernel``)
    where the device lists that kernel."""
    attention = device.attention_efficiency(c.attention_kernel) or device.fused_attention_efficiency
    own = {k: v for k, v in (("gemm_efficiency_max", device.gemm_efficiency),
                             ("fused_attention_efficiency", attention),
                             ("gemm_half_efficiency_dim", device.gemm_half_efficiency_dim)) if v is not None}
    return replace(c, **own) if own else c


def gemm_calls(kind: str, flops: float, m: int, n: int, k: int) -> float:
    """How many GEMMs of shape ``(m, n, k)`` one traced op stands for.

    One, except where the tracer merged identical kernels into one record: a recurrent layer's
    per-time-step GEMMs (:mod:`planner.trace.rnn`) are ``T`` kernels of a small ``m``, and each
    reads its weight again, so the weight traffic is per call, not per record.
    """
    if kind not in LINEAR_KINDS or not (m and n and k):
        return 1.0
    return max(1.0, float(round(flops / (2.0 * m * n * k))))


def tp_split_dims(kind: str, m: float, n: float, k: float, tp: int) -> tuple[float, float, float]:
    """The GEMM shape on one of ``tp`` devices: attention splits heads (folded into ``m``), a
    linear splits its larger output/input dim (column-parallel ``n``, row-parallel ``k``)."""
    if tp <= 1:
        return m, n, k
    if kind in ATTENTION_KINDS:
        return max(m / tp, 1.0), n, k
    if n >= k:
        return m, max(n / tp, 1.0), k
    return m, n, max(k / tp, 1.0)


def activation_shard(layer: Layer, tp: int, sequence_parallel: bool) -> float:
    """Fraction of a layer's activations (and element-wise work) one tp rank holds.

    Tensor parallelism splits everything between the column- and row-parallel GEMMs; layer norms,
    dropouts and residuals (``replicated_activation_bytes``) stay whole on every rank unless
    sequence parallelism splits them along the sequence (Korthikanti et al. 2022, §4.2).
    """
    return shard_fraction(layer.activation_bytes, layer.replicated_activation_bytes, tp, sequence_parallel)


def shard_fraction(activation_bytes: float, replicated_bytes: float, tp: int, sequence_parallel: bool) -> float:
    """:func:`activation_shard` of a layer whose activations are ``activation_bytes``, of which
    ``replicated_bytes`` stay whole without sequence parallelism."""
    if tp <= 1:
        return 1.0
    if sequence_parallel or activation_bytes <= 0:
        return 1.0 / tp
    replicated = min(1.0, replicated_bytes / activation_bytes)
    return replicated + (1.0 - replicated) / tp


@dataclass(frozen=True)
class LayerTimes:
    """Per micro-batch seconds on one device: forward, backward-input, backward-weight."""

    fwd_s: float
    bwd_input_s: float
    bwd_weight_s: float
    attention_fwd_s: float  # the part selective recomputation repeats
    op_kept_fwd_s: float = 0.0  # the part per-op checkpointing does not repeat (planner.trace.saved_ops)

    @property
    def bwd_s(self) -> float:
        return self.bwd_input_s + self.bwd_weight_s


def _gemm_times(layer: Layer, *, micro_batch: int, tp: int, device: DeviceSpec, dtype: str, c: CostConstants,
                gemm: tuple[GemmPoint, ...] | None, fp8: bool = False) -> tuple[float, float, float, float, float, float]:
    """The FLOP-counted ops of ``layer``: (forward seconds, of which attention GEMMs, of which fused
    attention kernels, FLOPs per sample, weight elements read by GEMMs, forward seconds of the ops
    per-op checkpointing keeps). ``fp8``: linears at the FP8 peak (:mod:`planner.cost.fp8`)."""
    peak = device.peak(dtype)
    fp8_peak = device.peak(FP8_PEAK) if fp8 else 0.0
    bw = device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
    c = device_constants(device, c)
    elt = DTYPE_BYTES.get(dtype, 2)
    gemm_fwd = attention_gemm = gemm_flops = fused_attention = 0.0
    weight_elems = kept_s = 0.0
    for op, kept in zip(layer.op_costs, kept_flags([op.kind for op in layer.op_costs])):
        if op.flops <= 0:
            continue
        flops = op.flops * micro_batch / tp
        # The trace's bytes are per sample with the weight read once per call; the weight does not
        # grow with the micro-batch.
        calls = gemm_calls(op.kind, op.flops, op.m, op.n, op.k)
        weight = calls * op.k * op.n * elt if op.kind in LINEAR_KINDS else 0.0
        weight_elems += op.k * op.n if op.kind in LINEAR_KINDS else 0.0
        nbytes = (max(op.bytes - weight, 0.0) * micro_batch + min(weight, op.bytes)) / tp
        if op.kind in ATTENTION_KERNELS:
            # A fused kernel (FlashAttention): its own efficiency, and under a causal mask it skips the
            # score tiles above the diagonal, about half the FLOPs the model is credited with.
            eff = c.fused_attention_efficiency
            if op.causal:
                flops *= 0.5
        elif op.m:
            m, n, k = tp_split_dims(op.kind, op.m * micro_batch, op.n, op.k, tp)
            eff = gemm_efficiency(m, n, k, c) if gemm is None else measured_gemm_efficiency(
                m, n, k, dtype=dtype, device=device, points=gemm, c=c)
        else:  # a FLOP-counted op without a GEMM shape: a large GEMM
            eff = c.gemm_efficiency_max
        if fp8 and op.m and op.kind in LINEAR_KINDS:  # torchao's float8 linear (cost/fp8.py)
            t = max(flops / (fp8_peak * eff * FP8_GEMM_EFFICIENCY_RATIO), nbytes / bw) + calls * c.kernel_overhead_s
        else:
            t = max(flops / (peak * eff), nbytes / bw) + calls * c.kernel_overhead_s
        gemm_fwd += t
        gemm_flops += op.flops
        kept_s += t if kept else 0.0
        if op.kind in ATTENTION_KINDS:
            attention_gemm += t
        if op.kind in ATTENTION_KERNELS:
            fused_attention += t
    return gemm_fwd, attention_gemm, fused_attention, gemm_flops, weight_elems, kept_s


def _with_host_dispatch(layer: Layer, c: CostConstants, fwd: float, bwd_in: float, bwd_w: float, attention: float,
                        att_share: float, kept: float = 0.0) -> LayerTimes:
    """The device times of a layer with the host's op dispatch added (or overlapped, ``async_dispatch``)."""
    host_fwd = layer.num_ops * c.op_dispatch_s
    if host_fwd > 0 and c.async_dispatch:
        # The device runs ahead of the host: a pass costs whichever is longer (autograd runs
        # about two ops per forward op).
        fwd_total = max(fwd, host_fwd)
        bwd, bwd_total = bwd_in + bwd_w, max(bwd_in + bwd_w, 2 * host_fwd)
        if bwd > 0:
            bwd_in, bwd_w = bwd_in * bwd_total / bwd, bwd_w * bwd_total / bwd
        else:
            bwd_in = bwd_total
        attention = attention * fwd_total / fwd if fwd > 0 else 0.0
        kept = kept * fwd_total / fwd if fwd > 0 else 0.0
        fwd = fwd_total
    elif host_fwd > 0:
        fwd += host_fwd
        bwd_in += 2 * host_fwd
        attention += host_fwd * min(1.0, att_share)
    return LayerTimes(fwd_s=fwd, bwd_input_s=bwd_in, bwd_weight_s=bwd_w, attention_fwd_s=attention,
                      op_kept_fwd_s=kept)


def layer_times(layer: Layer, *, micro_batch: int, tp: int, sequence_parallel: bool, device: DeviceSpec,
                dtype: str, c: CostConstants, gemm: tuple[GemmPoint, ...] | None = None,
                fp8: bool = False) -> LayerTimes:
    """Seconds for one micro-batch of ``layer`` on one of its ``tp`` devices (no communication).

    ``gemm``: the cluster's measured GEMM points (:func:`measured_gemm_efficiency`), if any. ``fp8``: its
    linears run as torchao's float8 linears, casts included (:mod:`planner.cost.fp8`).
    """
    bw = device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
    elt = DTYPE_BYTES.get(dtype, 2)
    gemm_fwd, attention_gemm, fused_attention, gemm_flops, weight_elems, kept = _gemm_times(
        layer, micro_batch=micro_batch, tp=tp, device=device, dtype=dtype, c=c, gemm=gemm, fp8=fp8)
    # Parameters read by memory-bound ops (embedding tables, norms, biases) once per micro-batch.
    params = max(layer.param_count - weight_elems, 0.0) * elt
    per_sample = sum(op.bytes for op in layer.op_costs if op.flops <= 0)
    mem_bytes = max(per_sample - params, 0.0) * micro_batch + min(params, per_sample)
    mem_fwd = mem_bytes * c.elementwise_traffic_factor * activation_shard(layer, tp, sequence_parallel) / bw
    if gemm_flops > 0:
        b_ratio = layer.bwd_input_flops / gemm_flops
        w_ratio = layer.bwd_weight_flops / gemm_flops
    else:
        b_ratio, w_ratio = 1.0, 0.0
    # A fused attention kernel's backward recomputes the scores it did not store: one more QKᵀ GEMM
    # (and the softmax) on top of the two gradient GEMMs per forward GEMM (Dao 2023: 2.5 x forward).
    bwd_in = gemm_fwd * b_ratio + 2 * mem_fwd + c.fused_attention_bwd_recompute * fused_attention
    bwd_w = gemm_fwd * w_ratio
    # Selective recomputation repeats the attention core: its GEMMs and the element-wise work on
    # the score tensors (softmax, dropout), which is the attention share of the saved activations.
    att_share = layer.attention_activation_bytes / layer.activation_bytes if layer.activation_bytes > 0 else 0.0
    attention = attention_gemm + mem_fwd * min(1.0, att_share)
    fwd = gemm_fwd + mem_fwd
    if fp8:  # the casts to fp8 of each linear's operands (memory-bound)
        cast_fwd, cast_bwd = cast_s(layer, micro_batch=micro_batch, tp=tp, device=device, c=c,
                                    linear_kinds=LINEAR_KINDS)
        fwd, bwd_in = fwd + cast_fwd, bwd_in + cast_bwd
    return _with_host_dispatch(layer, c, fwd, bwd_in, bwd_w, attention, att_share, kept)
