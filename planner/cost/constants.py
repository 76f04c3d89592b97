"""Every constant the cost model uses, in one record that each plan stores.

Where each value comes from (a datasheet, a paper, or the calibration against Megatron-LM's
published runs) is written next to it and, with the formulas that use it, in
docs/cost-model.md; the calibration itself is docs/calibration.md
(``python -m planner.cost.calibrate --markdown``). Change a value here and the plan files made
afterwards say so (``Plan.cost_constants``).

The defaults describe a GPU cluster running a Megatron-style trainer (fused element-wise
kernels, asynchronous kernel launches). A CPU run is described by the constants that
:func:`planner.cost.calibrate.cpu_constants` derives from micro-benchmarks of this machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Bytes per element of each training dtype (activations, gradients exchanged between ranks).
DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1}


@dataclass(frozen=True, kw_only=True)
class CostConstants:
    # --- compute --------------------------------------------------------------------------
    # A GEMM reaches eff_max · Π_d d / (d + d_half) of the dtype's peak over its (m, n, k):
    # large GEMMs approach eff_max, a GEMM with one small dim (attention's head dim, a small
    # micro-batch, a thin tensor-parallel shard) pays for tile quantisation and partial waves.
    # Chosen, not fitted; docs/calibration.md checks them against Narayanan et al. 2021 Table 1
    # and shows how the error moves when they move.
    gemm_efficiency_max: float = 0.80
    gemm_half_efficiency_dim: float = 96.0
    # Memory-bound ops reach this fraction of the HBM bandwidth (streaming kernels come close to
    # the datasheet figure; reductions such as layer norm and softmax do less).
    memory_bandwidth_efficiency: float = 0.70
    # Fraction of the element-wise traffic the trace measures (the eager PyTorch program: each
    # op reads and writes HBM) that a trainer with fused kernels actually moves: Megatron-LM fuses
    # scale+mask+softmax, bias+GeLU and bias+dropout+add, so the chains of the traced program
    # collapse to about one read and one write each. 1.0 for eager execution (the CPU).
    elementwise_traffic_factor: float = 0.35
    # Host time to dispatch one traced op (Python + ATen + launch). With ``async_dispatch`` the
    # device runs ahead of the host and a layer costs max(device, host) time; without it (CPU:
    # the "device" is the host) the two add up. The GPU value is the order of a CUDA launch.
    op_dispatch_s: float = 5e-6
    async_dispatch: bool = True
    # Kept for plan files written before op_dispatch_s existed: an extra per-op charge (s).
    kernel_overhead_s: float = 0.0
    # The training loss is not part of the traced model. For a model whose last layer emits
    # logits (a language model's head: [b, s, vocab]), cross-entropy moves that output in fp32
    # about this many times: forward log-softmax (read, write), backward zero-fill, scatter,
    # log-softmax backward (read two, write one). Charged to the last layer, 1/3 forward.
    loss_traffic_passes: float = 6.0
    # --- communication -------------------------------------------------------------------
    # Achievable fraction of a link's unidirectional bandwidth for NCCL collectives: inside a
    # node (NVLink/NVSwitch) and over the network (InfiniBand), where large messages come
    # closer to the line rate.
    link_efficiency: float = 0.80
    network_efficiency: float = 0.90
    # Megatron's scatter/gather for pipeline sends (Narayanan et al. 2021, §4.1): each of the tp
    # ranks of a stage sends 1/tp of the activation over its own NIC, the receiver all-gathers it
    # over NVLink.
    pp_scatter_gather: bool = True
    # --- memory ---------------------------------------------------------------------------
    # Bytes per parameter for mixed-precision Adam (Rajbhandari et al. 2020, ZeRO §3: 2 + 2 +
    # 12 = 16): bf16/fp16 weights and gradients, fp32 master weights, Adam m and v. Training
    # in fp32 keeps 4 + 4 + 8 (no master copy): see ``state_bytes``.
    weight_bytes: int = 2
    grad_bytes: int = 2
    optimizer_bytes: int = 12  # fp32 master weights, Adam m and v
    # fp32 copies of the last layer's output alive while the loss runs (the fp32 logits or the
    # log-probabilities autograd saves, the gradient of the log-probabilities, the gradient of the
    # logits); Megatron's vocabulary-parallel cross-entropy works in place on two.
    loss_workspace_copies: float = 2.0
    # Allocator: fraction of device memory usable after fragmentation (PyTorch's caching
    # allocator loses a few per cent), minus a fixed reserve for the CUDA context, NCCL
    # buffers and cuBLAS workspaces.
    allocator_usable_fraction: float = 0.95
    reserved_bytes: int = 2 * 2**30
    # Optimizer step traffic per parameter: read fp32 master, m, v and the gradient, write
    # master, m, v and the low-precision weight copy (4·3 + 2 + 4·3 + 2 = 28, rounded up for the
    # gradient-norm pass and the fp32 gradient copy Megatron keeps).
    optimizer_step_bytes_per_param: float = 36
    # Temporaries the optimizer step allocates per parameter it updates: none for a fused Adam
    # (Megatron, apex); 4 for torch's foreach AdamW in fp32 (one parameter-sized list, the square
    # root of the second moment). It runs after the activations are freed (see memory.py).
    optimizer_temp_bytes_per_param: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def state_bytes(self, dtype: str) -> tuple[float, float, float]:
        """(weight, gradient, optimizer) bytes per parameter when training in ``dtype``.

        Mixed precision (bf16/fp16/fp8) keeps the fp32 master copy in the optimizer state; fp32
        training holds fp32 weights and gradients and only Adam's m and v.
        """
        if DTYPE_BYTES.get(dtype, 2) >= 4:
            return 4.0, 4.0, 8.0
        return float(self.weight_bytes), float(self.grad_bytes), float(self.optimizer_bytes)


DEFAULT = CostConstants()
