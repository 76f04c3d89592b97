"""Calibrate the cost model to this CPU by profiling, then check it against measured training steps.

This is the one module of ``planner/cost`` that runs real compute (the rest is pure); only
``python -m planner.cost.calibrate --cpu`` and the tests that ask for it import it.

Profiled calibration (micro-benchmarks of the machine, never of the models we then predict):

* GEMM: fp32 ``torch.mm`` at square and skinny shapes; the fastest large one sets the device's
  fp32 peak (``gemm_efficiency_max = 1``), and ``gemm_half_efficiency_dim`` is the least-squares fit
  of ``eff(m, n, k) = Π d/(d + d_half)`` to the rest.
* Memory-bound ops: a mix of the element-wise ops a transformer runs (add, mul, GeLU, softmax,
  log-softmax, layer norm, masked fill, transpose copy) on 4 MiB tensors sets the effective
  bandwidth, bytes as the trace counts them over CPU seconds (``memory_bandwidth_efficiency = 1``:
  on a CPU these ops are as much compute-bound as memory-bound, which the mix captures); eager
  PyTorch moves what the trace counts (``elementwise_traffic_factor = 1``).
* Dispatch: a forward + backward of a tiny op chain gives the host time per op (``op_dispatch_s``);
  the CPU runs ops synchronously (``async_dispatch = False``).
* Loss: cross-entropy forward + backward on 8 and 32 MiB of fp32 logits, expressed as passes over
  the logits at the measured bandwidth (``loss_traffic_passes``; big fresh tensors also pay for
  page faults on first touch, which the element-wise mix on 4 MiB tensors does not see).
* Optimizer: one torch AdamW step over 1M parameters gives the seconds per parameter (expressed as
  ``optimizer_step_bytes_per_param`` at the measured bandwidth). torch's foreach AdamW allocates one
  fp32 parameter-sized temporary (``optimizer_temp_bytes_per_param = 4``).

Measured: a single-process training step (forward, cross-entropy loss, backward, AdamW) of
gpt-tiny and gpt-10m with plain torch on one intra-op thread, the least CPU time (process time, as
for the micro-benchmarks: the machine is shared, and the minimum is the least disturbed run) of
several steps after warm-up;
peak memory as tensor memory, the CPU analogue of ``torch.cuda.max_memory_allocated`` (weights and
optimizer state between steps plus the peak of one step's allocations, from the profiler's memory
events), in a fresh subprocess per model. (Not the process's resident set: what the C allocator keeps
from earlier work in the process makes it wander by tens of MiB, and the model leaves such
allocator overhead to its allocator margin.) Predicted: :func:`planner.api.evaluate` on a one-device cpu-local cluster
with the calibrated constants, i.e. what ``python -m planner evaluate`` computes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants

GiB = 2**30
MiB = 2**20


def _best_s(fn, *, warmup: int = 2, repeats: int = 7) -> float:
    """Least CPU seconds of ``fn`` over ``repeats`` runs (process time: other processes on a shared
    machine do not count; the minimum is the least disturbed run, for benchmarks and steps alike)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


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


def profile_cpu() -> CpuProfile:
    """Run the micro-benchmarks (a few seconds) on one intra-op thread, as the measured runs use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _profile()
    finally:
        torch.set_num_threads(threads)


def _profile() -> CpuProfile:
    torch.manual_seed(0)
    shapes = [(1024, 1024, 1024), (512, 512, 512), (256, 256, 256), (128, 128, 128), (64, 64, 64),
              (2048, 256, 256), (2048, 64, 256), (4096, 32, 64), (512, 2048, 128)]
    rates: list[tuple[tuple[int, int, int], float]] = []
    for m, n, k in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        t = _best_s(lambda a=a, b=b: torch.mm(a, b), repeats=9)
        rates.append(((m, n, k), 2 * m * n * k / t))
    peak = max(r for _, r in rates)
    best, best_err = 1.0, math.inf
    for d_half in [2.0 ** (x / 4) for x in range(0, 49)]:  # 1 .. 4096
        err = 0.0
        for (m, n, k), r in rates:
            eff = (m / (m + d_half)) * (n / (n + d_half)) * (k / (k + d_half))
            err += math.log(r / (peak * eff)) ** 2
        if err < best_err:
            best, best_err = d_half, err
    # Peak of the fitted curve: the largest measured rate divided by its fitted efficiency.
    (m, n, k), r = max(rates, key=lambda x: x[1])
    peak_fit = r / ((m / (m + best)) * (n / (n + best)) * (k / (k + best)))
    # Element-wise throughput: the ops a transformer's memory-bound share is made of, on 4 MiB
    # tensors, counted as the trace counts them (bytes read + written).
    x, y = torch.randn(256, 4096), torch.randn(256, 4096)
    mask = torch.rand(256, 4096) > 0.5
    ops = [(lambda: torch.add(x, y), 3), (lambda: torch.mul(x, y), 3), (lambda: torch.nn.functional.gelu(x), 2),
           (lambda: torch.softmax(x, -1), 2), (lambda: torch.log_softmax(x, -1), 2),
           (lambda: torch.nn.functional.layer_norm(x, (4096,)), 2), (lambda: x.masked_fill(mask, 0.0), 2.25),
           (lambda: x.t().contiguous(), 2)]
    moved = spent = 0.0
    for fn, tensors in ops:
        spent += _best_s(fn, repeats=9)
        moved += tensors * x.numel() * 4
    bandwidth = moved / spent
    # Dispatch: a chain of tiny ops, forward and backward, per op.
    w = torch.randn(4, requires_grad=True)

    def chain() -> None:
        h = w
        for _ in range(50):
            h = h * 1.0001 + 0.0001
        h.sum().backward()

    t_chain = _best_s(chain, repeats=9)
    per_op = t_chain / (100 * 3)  # 100 forward ops, about twice as many backward: 3 per forward op
    # The loss: cross-entropy forward + backward on fp32 logits of 8 and 32 MiB (vocabulary 8192), in
    # passes over the logits at the bandwidth above (large tensors also pay for first-touch page faults).
    passes = []
    for rows in (256, 1024):
        logits = torch.randn(rows, 8192, requires_grad=True)
        labels = torch.randint(0, 8192, (rows,))
        t_loss = _best_s(lambda lg=logits, lb=labels: torch.nn.functional.cross_entropy(lg, lb).backward())
        passes.append(t_loss * bandwidth / (logits.numel() * 4))
    # Optimizer: torch's AdamW (foreach) over 1M parameters in 16 tensors.
    params = [torch.nn.Parameter(torch.randn(1 << 16)) for _ in range(16)]
    for q in params:
        q.grad = torch.randn_like(q)
    opt = torch.optim.AdamW(params, lr=1e-4)
    t_opt = _best_s(opt.step, repeats=9)
    return CpuProfile(peak_flops=peak_fit, gemm_half_efficiency_dim=best, memory_bandwidth=bandwidth,
                      op_dispatch_s=per_op, optimizer_s_per_param=t_opt / (16 << 16),
                      loss_traffic_passes=sum(passes) / len(passes), threads=1)


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
                   grad_accumulation_bytes_per_param=12.0)


def cpu_cluster(profile: CpuProfile) -> ClusterSpec:
    """cpu-local with one device whose fp32 peak and bandwidth are the measured ones."""
    base = ClusterSpec.preset("cpu-local", nodes=1, devices_per_node=1)
    group = base.groups[0]
    device = replace(group.device, peak_flops={"fp32": profile.peak_flops},
                     memory_bandwidth_bytes_per_s=profile.memory_bandwidth)
    return replace(base, groups=(replace(group, device=device),))


_MEASURE = r"""
import dataclasses, json, sys, time
import torch
import torch.nn.functional as F
preset_name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
from planner.cost.cpu_calibration import profile_cpu
from planner.models import load_preset
p = load_preset(preset_name)
# Calibrate right before measuring, in the same process: a shared machine's speed drifts.
machine = profile_cpu()
model = p.build(device="cpu").train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
gen = torch.Generator().manual_seed(0)
tokens = torch.randint(0, p.config["vocab_size"], (batch, p.seq_len), generator=gen)
targets = torch.randint(0, p.config["vocab_size"], (batch, p.seq_len), generator=gen)
times = []
for i in range(steps + 2):
    start = time.process_time()
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if i >= 2:
        times.append(time.process_time() - start)
# Tensor memory (the CPU analogue of torch.cuda.max_memory_allocated): what lives between steps
# (weights, optimizer state) plus the peak of one step's allocations, from the profiler's events.
from torch.profiler import ProfilerActivity, profile
del logits, loss  # nothing from the timed steps may stay alive across the measured one
live = sum(q.numel() * q.element_size() for q in model.parameters())
live += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
            if isinstance(t, torch.Tensor))
with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    logits = model(tokens)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    del logits, loss
events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
cur = top = 0
for _, nbytes in events:
    cur += nbytes
    top = max(top, cur)
print(json.dumps({"step_s": min(times), "peak_bytes": live + top, "threads": torch.get_num_threads(),
                  "profile": dataclasses.asdict(machine)}))
"""


def measure_step(preset: str, batch: int, *, steps: int = 5) -> dict:
    """Least training-step CPU seconds and peak tensor bytes of ``preset`` at ``batch``, and the
    machine profile taken just before, in a fresh Python process."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, preset, str(batch), str(steps)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True, kw_only=True)
class CpuRow:
    preset: str
    batch: int
    predicted_s: float
    measured_s: float
    predicted_bytes: float
    measured_bytes: float

    @property
    def time_error(self) -> float:
        return self.predicted_s / self.measured_s - 1.0

    @property
    def memory_error(self) -> float:
        return self.predicted_bytes / self.measured_bytes - 1.0


def predict_step(preset: str, batch: int, profile: CpuProfile) -> tuple[float, float]:
    """Predicted (step seconds, peak bytes) of a one-device plan, through :func:`planner.api.evaluate`."""
    from planner.api import evaluate
    from planner.plan import ParallelConfig

    cfg = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=batch, num_micro_batches=1)
    plan = evaluate(preset, cpu_cluster(profile), cfg, constants=cpu_constants(profile), dtype="fp32")
    return plan.predicted.step_time_s, float(plan.predicted.peak_memory_bytes)


CPU_CASES = (("gpt-tiny", 4), ("gpt-tiny", 16), ("gpt-10m", 2), ("gpt-10m", 8))


def cpu_rows(cases=CPU_CASES) -> list[tuple[CpuProfile, CpuRow]]:
    """For each case: profile the machine and measure the step in one fresh process, then predict
    with that profile."""
    rows = []
    for preset, batch in cases:
        measured = measure_step(preset, batch)
        profile = CpuProfile(**measured["profile"])
        pred_s, pred_b = predict_step(preset, batch, profile)
        rows.append((profile, CpuRow(preset=preset, batch=batch, predicted_s=pred_s, measured_s=measured["step_s"],
                                     predicted_bytes=pred_b, measured_bytes=measured["peak_bytes"])))
    return rows


def cpu_report(*, markdown: bool = False) -> str:
    rows = cpu_rows()
    lines = ["| model | batch | profile: fp32 GFLOP/s, d_half, GB/s, µs/op | predicted step s | measured step s "
             "(CPU time) | error | predicted peak MiB | measured peak tensor MiB | error |",
             "|" + "---|" * 9]
    for prof, r in rows:
        fit = (f"{prof.peak_flops / 1e9:.0f}, {prof.gemm_half_efficiency_dim:.0f}, {prof.memory_bandwidth / 1e9:.1f}, "
               f"{prof.op_dispatch_s * 1e6:.1f}")
        lines.append(f"| {r.preset} | {r.batch} | {fit} | {r.predicted_s:.4f} | {r.measured_s:.4f} | "
                     f"{r.time_error:+.1%} | {r.predicted_bytes / MiB:.1f} | {r.measured_bytes / MiB:.1f} | "
                     f"{r.memory_error:+.1%} |")
    worst_t = max((r for _, r in rows), key=lambda r: abs(r.time_error))
    worst_m = max((r for _, r in rows), key=lambda r: abs(r.memory_error))
    lines.append("")
    lines.append(f"Largest errors: step time {worst_t.time_error:+.1%} ({worst_t.preset}, batch {worst_t.batch}), "
                 f"peak memory {worst_m.memory_error:+.1%} ({worst_m.preset}, batch {worst_m.batch}).")
    return "\n".join(lines)


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
    share = profile["compute_share"]
    if not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise SpecError("profile.compute_share", share, "expected a fraction in (0, 1]: rerun bench.cpu_profile")
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
    dispatch = fit_dispatch_s(profile, c)
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
    process at its measured share of the CPU (peak FLOP/s and bandwidth times ``compute_share``), the
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
    d["device"]["peak_flops"] = {"fp32": alone.peak_flops * share}
    d["device"]["memory_bandwidth_bytes_per_s"] = alone.memory_bandwidth * share
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


def fit_dispatch_s(profile: dict, c: CostConstants) -> float | None:
    """Host seconds per traced op that make the cost model's price of the framework micro-model's step
    (one process, all ``N`` busy) equal to the step the profile timed (``framework.alone``).

    The single-op chain of :func:`profile_cpu` measures ATen's dispatch alone; a model's op also pays
    for its module call, autograd's bookkeeping and the optimizer's per-tensor loop, which is what
    small models and small micro-batches are made of. The price is linear in ``op_dispatch_s``, so two
    evaluations give it. ``None`` when the profile has no framework step or the fit is not positive.
    """
    from planner.cost.model import evaluate as evaluate_cost
    from planner.cost.model import layer_table
    from planner.plan import ParallelConfig
    from planner.trace import trace_model

    fw = profile.get("framework") or {}
    if "alone" not in fw:
        return None
    h, blocks, rows = int(fw["hidden"]), int(fw["blocks"]), int(fw["rows"])
    graph = trace_model(framework_model(h, blocks), (torch.zeros(rows, h),), name="framework-mlp", dtype="fp32",
                        copy_model=False)
    one = cpu_profile_cluster(profile, measured_collectives=False)
    one = ClusterSpec.homogeneous(name="one-process", device=one.device, nodes=1, devices_per_node=1,
                                  intra_node=one.intra_node, inter_node=one.inter_node)
    cfg = ParallelConfig(dp=1, tp=1, pp=1, micro_batch_size=rows, num_micro_batches=1)

    def price(dispatch_s: float) -> float:
        cc = replace(c, op_dispatch_s=dispatch_s)
        table = layer_table(graph, one, micro_batch=rows, tp=1, sequence_parallel=False, recompute="none", c=cc)
        return evaluate_cost(graph, one, cfg, [(0, graph.num_layers)], cc, table=table).step_time_s

    base, slope = price(0.0), price(1e-5) - price(0.0)
    if slope <= 0:
        return None
    fitted = (float(fw["alone"]) - base) / slope * 1e-5
    return fitted if fitted > 0 else None
