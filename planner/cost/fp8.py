"""FP8 GEMMs with tensorwise scaling: torchao's float8 training (``convert_to_float8_training``) or Transformer
Engine's current per-tensor scaling (Megatron-LM ``--fp8-recipe tensorwise``).

Which ops: every linear (``nn.Linear``) but the output head, which torchtitan's float8 converter leaves in
bf16 (``filter_fqns = ["output"]``); attention's batched GEMMs and fused kernels stay in bf16.

Time of a linear on one device (the roofline of :mod:`planner.cost.compute`)::

    t = flops / (peak(fp8) · eff(m, n, k) · FP8_GEMM_EFFICIENCY_RATIO)

``peak(fp8)`` is the device's dense FP8 peak (H100 SXM: 1979 TFLOP/s, twice bf16's). A device without one
(A100, V100) cannot run FP8 GEMMs: :func:`check_fp8` refuses the configuration. The sustained
fraction of that peak is lower than bf16's: the scaled-mm kernels' epilogue applies the scales, and the
shapes that fill bf16 tiles fill fp8 ones less. ``FP8_GEMM_EFFICIENCY_RATIO = 0.8`` makes a large fp8 GEMM
1.6x a bf16 one (an assumption, not a fit); docs/cost-model.md ("FP8") checks the resulting step
speed-up against torchao's published end-to-end figure (1.25x on Llama 3 8B, 8 H100, torch.compile,
tensorwise scaling with the float8 all-gather).

The casts (memory-bound, ``CostConstants.fp8_cast_bytes_per_element`` bytes moved per element of the bf16
tensor, which the trainer decides: torchao under ``torch.compile`` reads it (2 B) and writes the fp8 copy
(1 B), the ``amax`` that dynamic scaling needs fused into the kernel producing the tensor: 3
(``FP8_CAST_BYTES_PER_ELEMENT``); eager torchao reads it once more for the ``amax``: 5; Transformer Engine
fuses the cast into the kernel that produces the tensor (LayerNorm, the activation) and keeps each
weight's fp8 copy for all of a step's micro-batches: 0, the default, as the other defaults describe
Megatron-LM)::

    forward    cast(input: m·k) + cast(weight: k·n)
    backward   cast(grad_output: m·n) + cast(input: m·k) + cast(weight: k·n)   the backward GEMMs take
                                                                            the transposed fp8 copies,
                                                                            re-cast from what was saved

Memory: torchao saves the bf16 (high-precision) input and weight for backward and re-casts them
(``Float8Linear``'s autograd function), so the stored activations and the bf16 weights, fp32 master
weights and optimizer state are those of bf16 training: FP8 changes no memory figure here (the fp8
copies are transient, one layer's at a time). FSDP's float8 all-gather (torchtitan's
``enable_fsdp_float8_all_gather``) would halve ZeRO-3's gather bytes; it is not priced (conservative).
"""

from __future__ import annotations

from planner.cluster import ClusterSpec, DeviceSpec
from planner.cost.constants import CostConstants
from planner.errors import SpecError
from planner.trace.graph import Layer

FP8_GEMM_EFFICIENCY_RATIO = 0.8  # sustained fp8 efficiency / bf16 efficiency at the same shape
FP8_CAST_BYTES_PER_ELEMENT = 3.0  # cast read (2 B) + fp8 write (1 B) per bf16 element; the amax fused upstream
FP8_PEAK = "fp8"

__all__ = ["FP8_CAST_BYTES_PER_ELEMENT", "FP8_GEMM_EFFICIENCY_RATIO", "cast_s", "check_fp8", "has_fp8"]


def has_fp8(device: DeviceSpec) -> bool:
    """Whether the device lists an FP8 peak (H100, H200, B200 do; A100 and V100 have no FP8 tensor cores)."""
    return FP8_PEAK in device.peak_flops


def check_fp8(cluster: ClusterSpec) -> None:
    """FP8 GEMMs need every device of ``cluster`` to have an FP8 peak; else a :class:`SpecError` naming ``fp8``."""
    missing = sorted({g.device.name for g in cluster.groups if not has_fp8(g.device)})
    if missing:
        raise SpecError("fp8", True, f"device {', '.join(missing)} has no FP8 peak (FP8 tensor cores start with "
                        "H100); drop --fp8, or give the device peak_flops.fp8 if it has them")


def cast_s(layer: Layer, *, micro_batch: int, tp: int, device: DeviceSpec, c: CostConstants,
           linear_kinds: frozenset[str]) -> tuple[float, float]:
    """Seconds of the fp8 casts of ``layer``'s linears (forward, backward) for one micro-batch on one of
    ``tp`` devices: memory-bound passes at the device's sustained bandwidth (module docstring)."""
    bw = device.memory_bandwidth_bytes_per_s * c.memory_bandwidth_efficiency
    fwd = bwd = 0.0
    for op in layer.op_costs:
        if op.kind not in linear_kinds or not (op.m and op.n and op.k):
            continue
        inp, weight, out = op.m * op.k * micro_batch, op.k * op.n, op.m * op.n * micro_batch
        fwd += (inp + weight) / tp
        bwd += (out + inp + weight) / tp
    per = c.fp8_cast_bytes_per_element
    return per * fwd / bw, per * bwd / bw
