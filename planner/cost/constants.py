"""Every constant the cost model uses, in one record that each plan stores.

Sources and calibration are in docs/cost-model.md; change a value here and the plan files made
afterwards say so (``Plan.cost_constants``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True, kw_only=True)
class CostConstants:
    # Compute: achievable fraction of peak for large GEMMs, and the size at which a GEMM dim
    # reaches half of that (tile quantisation and wave effects make small GEMMs slower).
    gemm_efficiency_max: float = 0.80
    gemm_half_efficiency_dim: float = 96.0
    # Memory-bound ops reach this fraction of HBM bandwidth.
    memory_bandwidth_efficiency: float = 0.70
    # Per-kernel launch/dispatch overhead (seconds), charged per op per micro-batch.
    kernel_overhead_s: float = 0.0
    # Communication: achievable fraction of link bandwidth for NCCL collectives.
    link_efficiency: float = 0.80
    # Memory: bytes per parameter for mixed-precision Adam (Rajbhandari et al., ZeRO).
    weight_bytes: int = 2
    grad_bytes: int = 2
    optimizer_bytes: int = 12  # fp32 master weights, Adam m and v
    # Allocator: fraction of device memory usable after fragmentation, minus a fixed reserve
    # (CUDA context, NCCL buffers, cuBLAS workspace).
    allocator_usable_fraction: float = 0.95
    reserved_bytes: int = 2 * 2**30
    # Optimizer step reads and writes weights, grads and states once (bytes per parameter).
    optimizer_step_bytes_per_param: int = 36

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT = CostConstants()
