"""Every constant the cost model uses, in one record that each plan stores.

Where each value comes from (a datasheet, a paper, or the calibration against Megatron-LM's
published runs) is written next to it and, with the formulas that use it, in
docs/cost-model.md; the calibration itself is docs/calibration.md
(``python -m tools.calibrate --markdown``). Change a value here and the plan files made
afterwards say so (``Plan.cost_constants``).

The defaults describe a GPU cluster running a Megatron-style trainer (fused element-wise
kernels, asynchronous kernel launches). A CPU run is described by the constants that
:func:`planner.cost.cpu_calibration.cpu_constants` derives from micro-benchmarks of this machine.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from planner.errors import SpecError

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
    # A fused attention kernel (FlashAttention-2 and the memory-efficient kernel SDPA picks) runs at
    # about this fraction of the dtype's dense peak on the FLOPs it really computes (a causal mask
    # halves them): Dao 2023 reports 50-73% of A100 peak forward and backward for FlashAttention-2
    # and 335 TFLOP/s (34%) on H100, FlashAttention-3 (Shah et al. 2024) 75% forward on H100.
    fused_attention_efficiency: float = 0.5
    # The attention kernel the trainer runs, where the device states its own figure for it
    # (``DeviceSpec.attention_kernels``): Transformer Engine, which Megatron-Core runs by default since
    # r0.8, picks cuDNN's fused attention on Hopper and later ("cudnn"). "" or a kernel the device does
    # not list: the device's FlashAttention-2-class ``fused_attention_efficiency``.
    attention_kernel: str = "cudnn"
    # Its backward repeats QKᵀ (scores are recomputed, not stored): 2.5 x the forward FLOPs where
    # the model's 2 x counts two gradient GEMMs per forward GEMM, i.e. 0.5 x the forward time more.
    fused_attention_bwd_recompute: float = 0.5
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
    # Fixed cost of one pipeline step (one chunk's forward or backward of one micro-batch) when
    # pp > 1, during which the device idles: the step waits on its received input (Megatron-LM
    # synchronises the stream after ``batch_isend_irecv``), so the host's lead is lost and the
    # step's first kernels wait on their launch, plus the p2p kernels' own launch and handshake
    # (tens of microseconds each) and the scheduler's Python. An estimate of that order, not a fit;
    # `python -m planner validate` shows what it does to the sweep's pipelined rows.
    pipeline_step_overhead_s: float = 2e-4
    # Kept for plan files written before op_dispatch_s existed: an extra per-op charge (s).
    kernel_overhead_s: float = 0.0
    # The training loss is not part of the traced model. For a model whose last layer emits
    # logits (a language model's head: [b, s, vocab]), cross-entropy moves that output in fp32
    # about this many times: forward log-softmax (read, write), backward zero-fill, scatter,
    # log-softmax backward (read two, write one). Charged to the last layer, 1/3 forward.
    loss_traffic_passes: float = 6.0
    # Under tensor parallelism, whether the loss runs on the vocabulary-split logits (Megatron's
    # vocabulary-parallel cross-entropy: each tp rank 1/tp of the loss, no gather). False: the head
    # all-gathers its output over tp and every tp rank computes the whole loss, which is what
    # torch's ``ColwiseParallel(output_layouts=Replicate())`` does (runtime/tensor_parallel.py).
    vocab_parallel_loss: bool = True
    # --- communication -------------------------------------------------------------------
    # Achievable fraction of a link's unidirectional bandwidth for NCCL collectives: inside a
    # node (NVLink/NVSwitch) and over the network (InfiniBand), where large messages come
    # closer to the line rate.
    link_efficiency: float = 0.80
    network_efficiency: float = 0.90
    # Fraction of the communication a runtime issues in the background (data-parallel gradient
    # buckets during backward, FSDP's prefetched all-gathers) that really runs while compute does.
    # 1 on GPUs: NCCL runs on its own stream and SMs. 0 where the collectives need the same cores as
    # the compute: gloo's threads on a CPU whose cores the ranks share (measured by
    # ``python -m bench.cpu_profile``: an all-reduce started before a GEMM loop adds its whole time).
    comm_compute_overlap: float = 1.0
    # What hidden communication costs the compute it hides behind: NCCL's kernels take SMs and
    # memory bandwidth from the GEMMs they run beside, which slow by this fraction of the hidden
    # communication's time.
    overlap_compute_slowdown: float = 0.0
    # Size of the gradient buckets an overlapped data-parallel reduction launches (PyTorch DDP's
    # ``bucket_cap_mb`` default, nanotron's ``ddp_bucket_cap_mb``: 25 MiB). The last one leaves when
    # the backward ends, so it is never hidden (planner.cost.grad_overlap).
    grad_bucket_bytes: float = 25 * 2**20
    # Fraction of the tensor-parallel collectives hidden behind the GEMMs they feed: Megatron-LM with
    # Transformer Engine's ``--tp-comm-overlap`` splits each all-gather / reduce-scatter into chunks
    # pipelined with the matching GEMM's chunks (Wang et al. 2023, "Overlap communication with dependent
    # computation via decomposition"; torch's async TP does the same). 0: Megatron's default, the
    # collectives run between the GEMMs. What is hidden is capped by the layer's GEMM time.
    tp_comm_overlap: float = 0.0
    # ZeRO-1/2 (Megatron's distributed optimizer with ``--overlap-param-gather``): the updated
    # parameters' all-gather runs bucket by bucket under the next step's first forward instead of
    # after the optimizer step, so only what that forward does not cover is exposed.
    overlap_param_gather: bool = False
    # Host seconds the data-parallel sharding framework spends per wrapped layer and micro-batch
    # beyond its collectives (FSDP2: gathering into and splitting out of flat buffers, DTensor
    # bookkeeping, the sharded optimizer's per-tensor dispatch), charged to every ZeRO stage the
    # runtime runs with FSDP. 0 where the host runs ahead of the device (GPUs); a CPU measures it
    # (``bench.cpu_profile``: a small MLP stack under FSDP2 against DDP).
    fsdp_layer_overhead_s: float = 0.0
    # The same for tensor parallelism, per split Linear or Embedding and micro-batch (torch's
    # DTensor dispatch and redistribution in ColwiseParallel / RowwiseParallel, and the optimizer
    # on DTensor parameters), beyond the tensor-parallel collectives. 0 on GPUs (hidden behind
    # device time); measured on a CPU (the same MLP stack split in tp pairs against one process).
    tp_layer_overhead_s: float = 0.0
    # What a tensor-parallel collective costs at least when the pipeline it runs in spans nodes, in a
    # trainer whose pipeline engine pays it (nanotron: ``TRAINERS["nanotron"]``): a fixed part per
    # collective plus a part per hop of its ring (``tp − 1``). A floor under the layer's device time,
    # not an addition: micro-batches with enough work per tp rank hide it. Measured, not derived: on
    # the H100 sweep a micro-batch's pass through a stage takes a fixed time per layer that does not
    # move with the micro-batch size or the hidden size (1B and 3B alike: about 11, 15 and 24 ms per
    # layer, forward + backward, at tp = 2, 4, 8; ``python -m tools.pipeline_slots``) once the pipeline
    # crosses nodes, a half to a third of that on one node (docs/cost-model.md, "Tensor parallelism
    # inside a multi-node pipeline"). 0: Megatron-LM's pipelined runs on thousands of GPUs show no
    # such floor (its published runs are priced without it).
    pipelined_tp_collective_s: float = 0.0
    pipelined_tp_hop_s: float = 0.0
    # Fraction of a pipeline bubble that other processes reclaim: where ``N`` processes time-share
    # ``C < N`` cores (more local CPU processes than cores), a process waiting in the bubble leaves its
    # share of the cores to the busy ones, which run faster meanwhile (1 − C/N of the bubble comes back,
    # e.g. 0.5 for 4 processes on 2 cores). 0 where every device is its own (GPUs, or N ≤ C).
    idle_reclaim_fraction: float = 0.0
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
    # bf16 keeps only 8 mantissa bits, too few to sum gradients across micro-batches and ranks:
    # Megatron-LM turns on ``accumulate_allreduce_grads_in_fp32`` whenever it trains in bf16, torch
    # FSDP2 as torchtitan sets it reduces in fp32, nanotron has ``accumulate_grad_in_fp32``. So a
    # bf16 run holds and reduces fp32 gradients: 2 + 4 + 12 = 18 bytes per parameter (Megatron's
    # distributed-optimizer table); fp16 keeps ``grad_bytes``.
    bf16_grad_bytes: int = 4
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
    # Host seconds per parameter tensor per optimizer step: a non-fused optimizer's Python loop over
    # tensors (torch's AdamW on a CPU runs a dozen small ops per tensor: tens of µs per tensor in this
    # project's CPU profiles; bench/cpu_profile.py measures it). 0 for GPU trainers, whose fused or multi-tensor
    # optimizers step a whole bucket at once.
    optimizer_tensor_overhead_s: float = 0.0
    # Memory traffic per local parameter to add one micro-batch's gradients into the step's gradient
    # sum, for each micro-batch after the first (a memory-bound pass over every parameter). 0 where
    # the weight-gradient GEMM accumulates in its own epilogue (Megatron-LM's
    # ``gradient_accumulation_fusion`` into the fp32 ``main_grad``); 12 for an accumulating hook or
    # autograd's AccumulateGrad: nanotron's ``accumulate_grad_in_fp32`` writes and reads the bf16
    # gradient (2 + 2) and reads and writes the fp32 sum (4 + 4); fp32 parameters under autocast
    # (torch, FSDP2) read the new gradient and the sum and write the sum (4 + 4 + 4).
    grad_accumulation_bytes_per_param: float = 0.0
    # Temporaries the optimizer step allocates per parameter it updates: none for a fused Adam
    # (Megatron, apex); 4 for torch's foreach AdamW in fp32 (one parameter-sized list, the square
    # root of the second moment). It runs after the activations are freed (see memory.py).
    optimizer_temp_bytes_per_param: float = 0.0
    # Bytes per parameter of the weights ZeRO-3 gathers and holds gathered (FSDP's ``param_dtype``): FSDP
    # with mixed precision keeps fp32 shards and gathers them cast to bf16 (llm-foundry, FMS, torchtitan:
    # 2). 0: the stored weight bytes (Megatron's bf16 weights; this project's runtime gathers its fp32).
    fsdp_param_bytes: float = 0.0
    # Bytes moved per element of each FP8 linear's input, weight and output gradient by its cast to fp8
    # (planner/cost/fp8.py): 0 where Transformer Engine fuses the casts into the kernels producing the
    # tensors (Megatron-LM), 3 for torchao under torch.compile, 5 for eager torchao (an extra amax read).
    fp8_cast_bytes_per_element: float = 0.0
    # Sequence parallelism as DTensor runs it (torch's PrepareModuleInput, torchtitan, this project's
    # runtime): the all-gather that opens a tensor-parallel region is its own autograd op, so the region's
    # first products save the gathered sequence for their weight gradients. Megatron-LM's linears save
    # their shard and gather it again in backward (False). Measured: tests/runtime/test_op_recompute_tp.py.
    sp_saves_gathered_inputs: bool = False
    # Whether the trainer fuses element-wise chains, so that a layer keeps the chain's inputs and not what
    # is inside it (Layer.pointwise_saved_bytes: an RMSNorm's normalised input before its weight, a
    # SwiGLU's silu(gate)). Megatron-LM and Transformer Engine do it by hand (fused RMSNorm/LayerNorm-linear,
    # bias-SwiGLU), torch.compile's partitioner by recomputing cheap element-wise ops; eager PyTorch
    # (this project's runtime, nanotron's GLU) keeps every saved tensor the trace sees (False).
    fused_pointwise_saves: bool = True
    # Whether the trainer's FP8 linears keep their saved inputs in FP8: Transformer Engine casts a linear's
    # input once and keeps that copy for the weight gradient (Layer.linear_input_bytes at half their bf16
    # bytes; an input another op saves too, as attention saves its output, gains the FP8 copy on top).
    # torchao's float8 linears keep the bf16 input and cast it again in backward (False).
    fp8_saves_linear_inputs: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    def gathered_weight_bytes(self, dtype: str) -> float:
        """Bytes per parameter of the weights ZeRO-3 all-gathers and holds gathered (``fsdp_param_bytes``)."""
        return float(self.fsdp_param_bytes) or self.state_bytes(dtype)[0]

    def state_bytes(self, dtype: str) -> tuple[float, float, float]:
        """(weight, gradient, optimizer) bytes per parameter when training in ``dtype``.

        Mixed precision (bf16/fp16/fp8) keeps the fp32 master copy in the optimizer state; fp32
        training holds fp32 weights and gradients and only Adam's m and v.
        """
        if DTYPE_BYTES.get(dtype, 2) >= 4:
            return 4.0, 4.0, 8.0
        grads = self.bf16_grad_bytes if dtype == "bf16" else self.grad_bytes
        return float(self.weight_bytes), float(grads), float(self.optimizer_bytes)


# What the trainer that runs the plan does to element-wise work, which the trace sees as eager
# PyTorch (each op reads and writes memory). The defaults describe Megatron-LM's fused kernels;
# torch.compile fuses element-wise chains the same way; a plain eager PyTorch trainer (nanotron,
# llm-foundry, torchtitan without compile, this project's runtime) moves every traced byte.
# The model state differs too: Megatron-LM keeps bf16 weights, fp32 gradients and an fp32 master copy
# in the optimizer (2 + 4 + 12 bytes per parameter); torch autocast and FSDP2 as torchtitan sets it,
# and this project's runtime, keep fp32 parameters and gradients and cast inside the kernels
# (4 + 4 + 8), which is `torch`.
# The host's time per op differs as well: every op an eager trainer runs goes through Python, the
# dispatcher and autograd's bookkeeping before its launch, about 16 µs per traced op (fitted on the
# H100 sweep's single-node groups, where tp>1 with one sequence per micro-batch is host-bound at
# ~70 ms per micro-batch of the 1B model whatever tp is; this machine's CPU profile measures 20 µs
# per op for the same stack). A fused trainer launches fewer, larger kernels: the default 5 µs per
# traced op stands for that.
TRAINERS: dict[str, dict[str, object]] = {
    "megatron": {},
    "compiled": {"fp8_cast_bytes_per_element": 3.0, "attention_kernel": "", "sp_saves_gathered_inputs": True,
                 "fp8_saves_linear_inputs": False},
    "eager": {"elementwise_traffic_factor": 1.0, "grad_accumulation_bytes_per_param": 12.0,
              "op_dispatch_s": 1.6e-5, "fp8_cast_bytes_per_element": 5.0, "attention_kernel": "",
              "sp_saves_gathered_inputs": True, "fused_pointwise_saves": False, "fp8_saves_linear_inputs": False},
    # nanotron: eager PyTorch around fused kernels (flash-attn's Triton RMSNorm and rotary embedding,
    # FlashAttention itself: Megatron's element-wise traffic, the default factor), and its pipeline
    # engine's floor under tensor-parallel collectives across nodes (fitted by ``python -m
    # tools.fit_cluster --param constants.pipelined_tp_collective_s --param constants.pipelined_tp_hop_s``).
    "nanotron": {"grad_accumulation_bytes_per_param": 12.0, "op_dispatch_s": 1.6e-5,
                 "fp8_cast_bytes_per_element": 5.0, "pipelined_tp_collective_s": 8e-4, "pipelined_tp_hop_s": 3e-4,
                 "attention_kernel": "", "fused_pointwise_saves": False, "fp8_saves_linear_inputs": False},
    "torch": {"elementwise_traffic_factor": 1.0, "weight_bytes": 4, "grad_bytes": 4, "bf16_grad_bytes": 4,
              "optimizer_bytes": 8, "grad_accumulation_bytes_per_param": 12.0, "fp8_cast_bytes_per_element": 5.0,
              "attention_kernel": "", "sp_saves_gathered_inputs": True, "fused_pointwise_saves": False,
              "fp8_saves_linear_inputs": False},
}


def trainer_constants(trainer: str, base: CostConstants | None = None) -> CostConstants:
    """``base`` (default: the defaults) as the named trainer runs it (:data:`TRAINERS`)."""
    if trainer not in TRAINERS:
        raise SpecError("trainer", trainer, f"use one of {sorted(TRAINERS)}")
    return replace(base or CostConstants(), **TRAINERS[trainer])


DEFAULT = CostConstants()


def constants_from_file(path: str, base: CostConstants | None = None) -> CostConstants:
    """``base`` (default: the defaults) with the fields a JSON file sets: what ``planner plan --constants``
    and ``validate --constants`` read (``python -m bench.cpu_profile --constants-out`` writes one for this
    machine). A field of the wrong name or type is a SpecError naming it."""
    return replace(base or CostConstants(), **constant_fields_from_file(path))


# Fractions of a peak or of the memory that the cost model divides by: in (0, 1].
_RATES = frozenset({"gemm_efficiency_max", "fused_attention_efficiency", "memory_bandwidth_efficiency",
                    "link_efficiency", "network_efficiency", "allocator_usable_fraction"})
# Shares of a time or of a pass that may be none of it: in [0, 1].
_SHARES = frozenset({"comm_compute_overlap", "tp_comm_overlap", "idle_reclaim_fraction",
                     "fused_attention_bwd_recompute"})


def constant_fields_from_file(path: str) -> dict[str, Any]:
    """The CostConstants fields a JSON constants file sets, checked (:func:`constants_from_file`): the
    caller's explicit overrides, a value equal to the default included."""
    from dataclasses import fields

    from planner.errors import read_json_file

    data = read_json_file(path, "--constants", what="the constants file", damaged_fix="fix the syntax")
    if not isinstance(data, dict):
        raise SpecError("--constants", path, "expected a JSON object of CostConstants fields")
    kinds = {f.name: {"bool": bool, "int": int, "str": str}.get(str(f.type), float) for f in fields(CostConstants)}
    unknown = sorted(set(data) - set(kinds))
    if unknown:
        raise SpecError("--constants", unknown, f"not CostConstants fields; known: {sorted(kinds)}")
    for name, value in data.items():
        want = kinds[name]
        if want is str:
            if not isinstance(value, str):
                raise SpecError(f"--constants: {name}", value, 'expected a string, e.g. "cudnn" or ""')
            continue
        ok = isinstance(value, bool) if want is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (want is float or value == int(value)))
        if not ok:
            raise SpecError(f"--constants: {name}", value, f"expected a finite {want.__name__}")
        if want is not bool and value < 0:  # times, bytes, fractions and counts: none is negative
            raise SpecError(f"--constants: {name}", value, "expected a value >= 0")
        if name in _RATES and not 0 < value <= 1:
            raise SpecError(f"--constants: {name}", value, "expected a fraction in (0, 1]: the share of the peak "
                            "or of the memory that is reached (0.7 for 70%)")
        if name in _SHARES and value > 1:
            raise SpecError(f"--constants: {name}", value, "expected a fraction in [0, 1] (0.5 for half)")
    return {k: (int(v) if kinds[k] is int else v) for k, v in data.items()}
