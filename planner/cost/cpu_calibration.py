"""Cost constants and a cluster for this machine's CPU, from what the benchmarks measured.

The measuring is in ``bench/`` (it runs real compute and starts processes; ``planner/`` never does):
:mod:`bench.cpu_calibration` micro-benchmarks one process (:class:`CpuProfile`) and checks the
prediction against measured training steps (``python -m tools.calibrate --cpu``);
:mod:`bench.cpu_profile` measures ``N`` local processes. What is here turns those measurements into
what the planner prices with, purely:

* :func:`cpu_constants` / :func:`cpu_cluster`: one process. GEMM: the fastest large fp32 ``torch.mm``
  sets the device's peak (``gemm_efficiency_max = 1``) and ``gemm_half_efficiency_dim`` is the fit of
  ``eff(m, n, k) = Π d/(d + d_half)`` to the rest; memory-bound ops: the measured bandwidth of the
  element-wise mix a transformer runs (``memory_bandwidth_efficiency = 1``,
  ``elementwise_traffic_factor = 1``: eager PyTorch moves what the trace counts); dispatch: host time
  per op, synchronous (``async_dispatch = False``); loss: cross-entropy forward + backward in passes
  over the logits; optimizer: torch's AdamW seconds per parameter as bytes at the measured bandwidth,
  with one fp32 parameter-sized temporary (``optimizer_temp_bytes_per_param = 4``).
* :func:`cpu_profile_constants` / :func:`cpu_profile_cluster`: ``N`` processes from a
  ``bench.cpu_profile`` JSON (shares of the CPU, gloo links fitted to the collectives, framework
  overheads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants


@dataclass(frozen=True, kw_only=True)
class CpuProfile:
    """What the micro-benchmarks measured on this machine."""

    peak_flops: float  # fp32 FLOP/s of the fastest large GEMM
    gemm_half_efficiency_dim: float
    memory_bandwidth: float  # bytes/s of a few-MB element-wise op
    op_dispatch_s: float  # host seconds per op (forward + backward averaged)
    optimizer_s_per_param: float  # one AdamW step, per parameter
    loss_traffic_passes: float  # cross-entropy forward + backward, in passes over fp32 logits
    threads: int


def cpu_constants(profile: CpuProfile, base: CostConstants | None = None) -> CostConstants:
    """Cost constants for this CPU: the profile's fits, eager execution, synchronous dispatch."""
    base = base or CostConstants()
    return replace(base, gemm_efficiency_max=1.0, gemm_half_efficiency_dim=profile.gemm_half_efficiency_dim,
                   memory_bandwidth_efficiency=1.0, elementwise_traffic_factor=1.0,
                   op_dispatch_s=profile.op_dispatch_s, async_dispatch=False, reserved_bytes=0,
                   optimizer_step_bytes_per_param=profile.optimizer_s_per_param * profile.memory_bandwidth,
                   optimizer_temp_bytes_per_param=4.0, loss_traffic_passes=profile.loss_traffic_passes,
                   # the runtime trains fp32 parameters: autograd's AccumulateGrad reads the new gradient
                   # and the sum and writes the sum for every micro-batch after the first
                   grad_accumulation_bytes_per_param=12.0,
                   # and keeps what eager PyTorch saves, DTensor's gathered inputs included (the torch trainer)
                   fused_pointwise_saves=False, fp8_saves_linear_inputs=False, sp_saves_gathered_inputs=True)


def cpu_cluster(profile: CpuProfile) -> ClusterSpec:
    """cpu-local with one device whose fp32 peak and bandwidth are the measured ones."""
    base = ClusterSpec.preset("cpu-local", nodes=1, devices_per_node=1)
    group = base.groups[0]
    device = replace(group.device, peak_flops={"fp32": profile.peak_flops},
                     memory_bandwidth_bytes_per_s=profile.memory_bandwidth)
    return replace(base, groups=(replace(group, device=device),))


# --- N local processes: what ``bench.cpu_profile`` measured, as a cluster and cost constants --------

# nccl-tests' bus-bandwidth factors (the busbw a collective of n ranks reports for S bytes in t s is
# factor · S / t): all-reduce 2(n−1)/n, all-gather and reduce-scatter (n−1)/n, send/recv 1.
def bus_factor(collective: str, n: int) -> float:
    if collective == "send_recv":
        return 1.0
    if n <= 1:
        return 0.0
    return 2 * (n - 1) / n if collective == "all_reduce" else (n - 1) / n


def _check_profile(profile: dict) -> None:
    from planner.errors import SpecError

    for key in ("nproc", "alone", "compute_share", "collectives", "overlap"):
        if key not in profile:
            raise SpecError(f"profile.{key}", None, "missing: write the profile with `python -m bench.cpu_profile "
                            "--nproc N -o PROFILE.json`")
    for key in ("compute_share", "gemm_share", "memory_share"):
        share = profile.get(key, 1.0)
        if not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise SpecError(f"profile.{key}", share, "expected a fraction in (0, 1]: rerun bench.cpu_profile")
    if not profile["collectives"].get("all_reduce"):
        raise SpecError("profile.collectives.all_reduce", None, "no all-reduce points: rerun bench.cpu_profile")


def fit_alpha_beta(profile: dict) -> tuple[float, float]:
    """``(latency_s, bandwidth_bytes_per_s)`` of the link that makes comm.py's ring formulas
    (``t = f·S/B + (n−1)·k·α``, k = 2 for an all-reduce, 1 for all-gather and reduce-scatter; a
    send/recv is ``S/B + α``) closest, in relative error, to every measured collective point."""
    n = int(profile["nproc"])
    rows = []  # (bytes coefficient, latency coefficient, seconds)
    for name, points in profile["collectives"].items():
        hops = 1.0 if name == "send_recv" else (2.0 if name == "all_reduce" else 1.0) * max(n - 1, 1)
        coef = 1.0 if name == "send_recv" else bus_factor(name, n)
        rows += [(coef * p["message_bytes"], hops, p["seconds"]) for p in points if p["seconds"] > 0]
    best = (math.inf, 0.0, 0.0)
    # A grid in log space (two parameters, a few hundred points: exact enough, and deterministic).
    for i in range(121):
        alpha = 1e-6 * 10 ** (i / 30)  # 1 µs .. 10 s
        for j in range(121):
            bw = 1e7 * 10 ** (j / 30)  # 10 MB/s .. 100 GB/s
            err = sum(math.log((x / bw + h * alpha) / t) ** 2 for x, h, t in rows)
            if err < best[0]:
                best = (err, alpha, bw)
    return best[1], best[2]


def cpu_profile_constants(profile: dict, base: CostConstants | None = None) -> CostConstants:
    """Cost constants of ``N`` local processes from a ``bench.cpu_profile`` JSON.

    The single-process fits (:func:`cpu_constants`) with the host's dispatch time stretched by the
    compute share (each process gets that fraction of its lone speed while all are busy), links at
    their measured rate (``link_efficiency = 1``: the profile measured achieved, not line, rates) and
    the measured overlap of communication with compute.
    """
    _check_profile(profile)
    alone = CpuProfile(**profile["alone"])
    share = float(profile["compute_share"])
    c = cpu_constants(alone, base)
    # The runtime these processes run gathers a tensor-parallel head's output and computes the whole
    # loss on every tp rank (runtime/tensor_parallel.py): no vocabulary-parallel loss.
    # The communication the cost model lets hide behind compute is FSDP's prefetched gathers (and DDP's
    # buckets, which the search prices unhidden: overlap_grad_reduce=False). FSDP2 unshards with
    # ``async_op=False`` off CUDA (torch's default ``unshard_async_op``; a CPU has no streams), so each
    # gather blocks the process: none of it overlaps, whatever an asynchronous all-reduce could do
    # (``overlap.fraction`` of the profile, which the page reports: about 0 when the ranks fill the
    # cores, more when other users' load gives gloo's thread a share of its own).
    c = replace(c, op_dispatch_s=alone.op_dispatch_s / share, link_efficiency=1.0, network_efficiency=1.0,
                comm_compute_overlap=0.0, vocab_parallel_loss=False)
    fsdp_s, tp_s, pp_s = framework_overheads(profile, cpu_profile_cluster(profile), c)
    cores, n = int(profile.get("cpu_count") or n_default(profile)), int(profile["nproc"])
    threads = int(profile.get("threads_per_process") or 1)
    reclaim = max(0.0, 1.0 - cores / (n * threads))
    c = replace(c, fsdp_layer_overhead_s=fsdp_s, tp_layer_overhead_s=tp_s, pipeline_step_overhead_s=pp_s / 2,
                idle_reclaim_fraction=reclaim)
    dispatch, per_tensor = fit_host_overheads(profile, c)
    c = replace(c, optimizer_tensor_overhead_s=per_tensor)
    return c if dispatch is None else replace(c, op_dispatch_s=max(dispatch, c.op_dispatch_s))


def n_default(profile: dict) -> int:
    """Cores, when a profile does not say: as many as processes (no time-sharing)."""
    return int(profile["nproc"])


def framework_overheads(profile: dict, cluster: ClusterSpec, c: CostConstants) -> tuple[float, float, float]:
    """``(fsdp_layer_overhead_s, tp_layer_overhead_s, pipeline seconds per micro-batch and chunk)`` from
    the profile's framework micro-model (the last is forward and backward together: twice
    ``pipeline_step_overhead_s``, which is per direction).

    ``bench.cpu_profile`` times one step of ``blocks`` blocks (``Linear(h, 4h)``, GELU, ``Linear(4h, h)``)
    alone, under DDP, under FSDP2 (one unit per block) and split in tp pairs. What a step costs beyond the
    collectives the cost model prices itself is the framework's. The cost model prices ZeRO-3's
    collectives as two all-gathers and a reduce-scatter of the whole stage per micro-batch, so FSDP's
    share is ``(t_fsdp − t_ddp − (2·AG(all) + RS(all) − AR(all))) / blocks`` per layer: the latency of
    each layer's own collectives is part of it, as it is part of every wrapped layer's cost. Tensor
    parallelism's is ``(t_tp − t_alone − blocks·2·AR(rows·h)) / (2·blocks)`` per split Linear (each
    block: one row-parallel all-reduce forward, one column-parallel all-reduce backward). Pipelining's,
    from a two-stage 1F1B over ``m`` micro-batches against this rank's half alone (``t_half``, the same
    micro-batches one after another): ``(t_pp − (m + 1)/m · t_half) / (m + 1) − 2·p2p(rows·h)`` per
    micro-batch (``m + 1`` slots of forward and backward on the critical path, each with a send forward
    and one backward). Never below 0.
    """
    from planner.cost.comm import all_gather_s, all_reduce_s, reduce_scatter_s, strided_group

    fw = profile.get("framework") or {}
    if not fw or "ddp" not in fw:
        return 0.0, 0.0, 0.0
    blocks, h, rows = int(fw["blocks"]), int(fw["hidden"]), int(fw["rows"])
    block_bytes = 4.0 * (2 * h * 4 * h + 4 * h + h)
    world = strided_group(cluster, int(profile["nproc"]), 1)
    fsdp_comm = 2 * all_gather_s(blocks * block_bytes, world, c) + reduce_scatter_s(blocks * block_bytes, world, c)
    ddp_comm = all_reduce_s(blocks * block_bytes, world, c)
    fsdp_s = max(0.0, (fw["fsdp"] - fw["ddp"] - (fsdp_comm - ddp_comm)) / blocks)
    tp_s = 0.0
    if "tp" in fw:
        pair = strided_group(cluster, 2, 1)
        tp_comm = blocks * 2 * all_reduce_s(4.0 * rows * h, pair, c)
        tp_s = max(0.0, (fw["tp"] - fw["alone"] - tp_comm) / (2 * blocks))
    pp_s = 0.0
    if "pp" in fw:
        from planner.cost.comm import p2p_s

        m = int(fw["pp_micro_batches"])
        slots = m + 1
        send = p2p_s(4.0 * rows * h, same_node=True, cluster=cluster, c=c)
        pp_s = max(0.0, (fw["pp"] - slots / m * fw["pp_half_alone"]) / slots - 2 * send)
    return fsdp_s, tp_s, pp_s


def cpu_profile_cluster(profile: dict, *, name: str | None = None, measured_collectives: bool = True) -> ClusterSpec:
    """The cpu-local cluster of ``N`` processes from a ``bench.cpu_profile`` JSON: each device is one
    process at its measured share of the CPU (peak FLOP/s times ``gemm_share``, bandwidth times
    ``memory_share``; both ``compute_share`` in a profile without them), the
    loopback link fitted to the measured collectives (:func:`fit_alpha_beta`), and, when the cluster
    format has it, the measured collectives themselves (``collectives``: bus bandwidth per point)."""
    _check_profile(profile)
    alone = CpuProfile(**profile["alone"])
    share = float(profile["compute_share"])
    n = int(profile["nproc"])
    base = ClusterSpec.preset("cpu-local", nodes=1, devices_per_node=n)
    d = base.to_dict()
    d["name"] = name or f"cpu-local-n{n}"
    d["description"] = (f"{n} local processes on {profile.get('cpu_count', '?')} CPUs, measured by bench.cpu_profile: "
                        f"each process keeps {share:.2f} of its lone speed while all are busy; links fitted to gloo")
    # GEMMs and memory streams keep their own shares where the profile measured them: two processes on two
    # cores hardly contend for arithmetic and do for the memory bus (calibration.md)
    d["device"]["peak_flops"] = {"fp32": alone.peak_flops * float(profile.get("gemm_share", share))}
    d["device"]["memory_bandwidth_bytes_per_s"] = alone.memory_bandwidth * float(profile.get("memory_share", share))
    alpha, bw = fit_alpha_beta(profile)
    for link in ("intra_node", "inter_node"):
        d[link]["latency_s"] = alpha
        d[link]["bandwidth_bytes_per_s"] = bw
    if measured_collectives:
        d["collectives"] = {
            name_: [{"nodes": 1, "message_bytes": float(p["message_bytes"]),
                     "bus_bandwidth_bytes_per_s": bus_factor(name_, n) * p["message_bytes"] / p["seconds"]}
                    for p in points]
            for name_, points in profile["collectives"].items() if bus_factor(name_, n) > 0}
    return ClusterSpec.from_dict(d, source=d["name"])


def framework_model(hidden: int, blocks: int):
    """The micro-model ``bench.cpu_profile`` times: ``blocks`` of ``Linear(h, 4h)``, GELU, ``Linear(4h, h)``."""
    from torch import nn

    return nn.Sequential(*[nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))
                           for _ in range(blocks)])


def fit_host_overheads(profile: dict, c: CostConstants) -> tuple[float | None, float]:
    """``(op_dispatch_s, optimizer_tensor_overhead_s)``: host seconds per traced op, and per parameter tensor
    of the optimizer's step, that make the cost model's price of the framework micro-model's step (one
    process, all ``N`` busy) equal to what the profile timed.

    The single-op chain of :func:`profile_cpu` measures ATen's dispatch alone; a model's op also pays
    for its module call and autograd's bookkeeping, which is what small models and small micro-batches
    are made of. The forward-backward alone (``framework.alone_fwd_bwd``) fits the first: its price is
    linear in ``op_dispatch_s``, so two evaluations give it. The optimizer's step alone
    (``framework.alone_optimizer``), less what its per-parameter traffic is priced at, is its per-tensor
    loop: half the micro-model's step on this machine, and once per step, not once per micro-batch, so
    it must not pass for dispatch. A profile without the two parts fits the whole step to dispatch (as
    before). ``None`` dispatch when the profile has no framework step or the fit is not positive.
    """
    from planner.cost.model import evaluate as evaluate_cost
    from planner.cost.model import layer_table

    fw = profile.get("framework") or {}
    if "alone" not in fw:
        return None, 0.0
    graph, one, cfg = _framework_setup(profile, fw)
    split = "alone_fwd_bwd" in fw and "alone_optimizer" in fw

    def price(dispatch_s: float) -> tuple[float, float]:
        cc = replace(c, op_dispatch_s=dispatch_s)
        table = layer_table(graph, one, micro_batch=cfg.micro_batch_size, tp=1, sequence_parallel=False,
                            recompute="none", c=cc)
        pred = evaluate_cost(graph, one, cfg, [(0, graph.num_layers)], cc, table=table)
        optimizer = pred.time_breakdown_s.get("optimizer", 0.0)
        return (pred.step_time_s - optimizer if split else pred.step_time_s), optimizer

    (base, optimizer), (bumped, _) = price(0.0), price(1e-5)
    if bumped - base <= 0:
        return None, 0.0
    target = float(fw["alone_fwd_bwd"] if split else fw["alone"])
    fitted = (target - base) / (bumped - base) * 1e-5
    tensors = sum(lay.trained_tensors for lay in graph.layers)
    per_tensor = max(0.0, float(fw["alone_optimizer"]) - optimizer) / tensors if split and tensors else 0.0
    return (fitted if fitted > 0 else None), per_tensor


def _framework_setup(profile: dict, fw: dict):
    """The framework micro-model traced, the one-process cluster and the configuration it is priced at."""
    from planner.plan import ParallelConfig
    from planner.trace import trace_model

    h, blocks, rows = int(fw["hidden"]), int(fw["blocks"]), int(fw["rows"])
    graph = trace_model(framework_model(h, blocks), (torch.zeros(rows, h),), name="framework-mlp", dtype="fp32",
                        copy_model=False)
    one = cpu_profile_cluster(profile, measured_collectives=False)
    one = ClusterSpec.homogeneous(name="one-process", device=one.device, nodes=1, devices_per_node=1,
                                  intra_node=one.intra_node, inter_node=one.inter_node)
    return graph, one, ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=rows, num_micro_batches=1)
