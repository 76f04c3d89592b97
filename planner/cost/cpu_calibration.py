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
* Optimizer: one torch AdamW step over 1M parameters gives the seconds per parameter (expressed as
  ``optimizer_step_bytes_per_param`` at the measured bandwidth). torch's foreach AdamW allocates one
  fp32 parameter-sized temporary (``optimizer_temp_bytes_per_param = 4``).

Measured: a single-process training step (forward, cross-entropy loss, backward, AdamW) of
gpt-tiny and gpt-10m with plain torch on one intra-op thread, the median CPU time (process time:
the machine is shared, and other processes' load does not count) of several steps after warm-up;
peak memory as the process's peak resident set (``VmHWM``, reset after imports and torch's lazy
initialisation) minus its resident set at that point, in a fresh subprocess per model. Predicted: :func:`planner.api.evaluate` on a one-device cpu-local cluster
with the calibrated constants, i.e. what ``python -m planner evaluate`` computes.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants

GiB = 2**30
MiB = 2**20


def _median_s(fn, *, warmup: int = 2, repeats: int = 7) -> float:
    """Median CPU seconds of ``fn`` (process time: other processes on a shared machine do not count)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


@dataclass(frozen=True, kw_only=True)
class CpuProfile:
    """What the micro-benchmarks measured on this machine."""

    peak_flops: float  # fp32 FLOP/s of the fastest large GEMM
    gemm_half_efficiency_dim: float
    memory_bandwidth: float  # bytes/s of a few-MB element-wise op
    op_dispatch_s: float  # host seconds per op (forward + backward averaged)
    optimizer_s_per_param: float  # one AdamW step, per parameter
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
        t = _median_s(lambda a=a, b=b: torch.mm(a, b), repeats=9)
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
        spent += _median_s(fn, repeats=9)
        moved += tensors * x.numel() * 4
    bandwidth = moved / spent
    # Dispatch: a chain of tiny ops, forward and backward, per op.
    w = torch.randn(4, requires_grad=True)

    def chain() -> None:
        h = w
        for _ in range(50):
            h = h * 1.0001 + 0.0001
        h.sum().backward()

    t_chain = _median_s(chain, repeats=9)
    per_op = t_chain / (100 * 3)  # 100 forward ops, about twice as many backward: 3 per forward op
    # Optimizer: torch's AdamW (foreach) over 1M parameters in 16 tensors.
    params = [torch.nn.Parameter(torch.randn(1 << 16)) for _ in range(16)]
    for q in params:
        q.grad = torch.randn_like(q)
    opt = torch.optim.AdamW(params, lr=1e-4)
    t_opt = _median_s(opt.step, repeats=9)
    return CpuProfile(peak_flops=peak_fit, gemm_half_efficiency_dim=best, memory_bandwidth=bandwidth,
                      op_dispatch_s=per_op, optimizer_s_per_param=t_opt / (16 << 16), threads=1)


def cpu_constants(profile: CpuProfile, base: CostConstants | None = None) -> CostConstants:
    """Cost constants for this CPU: the profile's fits, eager execution, synchronous dispatch."""
    base = base or CostConstants()
    return replace(base, gemm_efficiency_max=1.0, gemm_half_efficiency_dim=profile.gemm_half_efficiency_dim,
                   memory_bandwidth_efficiency=1.0, elementwise_traffic_factor=1.0,
                   op_dispatch_s=profile.op_dispatch_s, async_dispatch=False, reserved_bytes=0,
                   optimizer_step_bytes_per_param=profile.optimizer_s_per_param * profile.memory_bandwidth,
                   optimizer_temp_bytes_per_param=4.0)


def cpu_cluster(profile: CpuProfile) -> ClusterSpec:
    """cpu-local with one device whose fp32 peak and bandwidth are the measured ones."""
    base = ClusterSpec.preset("cpu-local", nodes=1, devices_per_node=1)
    group = base.groups[0]
    device = replace(group.device, peak_flops={"fp32": profile.peak_flops},
                     memory_bandwidth_bytes_per_s=profile.memory_bandwidth)
    return replace(base, groups=(replace(group, device=device),))


_MEASURE = r"""
import json, resource, statistics, sys, time
import torch
import torch.nn.functional as F
preset_name, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
torch.manual_seed(0)
from planner.models import load_preset
p = load_preset(preset_name)
# Baseline after imports and torch's lazy initialisation: a small training step on an unrelated tensor.
w = torch.randn(64, 64, requires_grad=True)
F.cross_entropy(w @ w, torch.zeros(64, dtype=torch.long)).backward()
torch.optim.AdamW([w]).step()
del w


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return None


try:  # reset the peak-RSS mark so that imports' transients do not hide the training peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
except OSError:
    base = None
if base is None:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
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
peak = status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"step_s": statistics.median(times), "peak_bytes": peak - base, "threads": torch.get_num_threads()}))
"""


def measure_step(preset: str, batch: int, *, steps: int = 5) -> dict:
    """Median training-step seconds and peak-memory growth (bytes) of ``preset`` at ``batch``,
    in a fresh Python process (so the peak RSS belongs to this model alone)."""
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


def cpu_rows(cases=CPU_CASES, profile: CpuProfile | None = None) -> tuple[CpuProfile, list[CpuRow]]:
    profile = profile or profile_cpu()
    rows = []
    for preset, batch in cases:
        measured = measure_step(preset, batch)
        pred_s, pred_b = predict_step(preset, batch, profile)
        rows.append(CpuRow(preset=preset, batch=batch, predicted_s=pred_s, measured_s=measured["step_s"],
                           predicted_bytes=pred_b, measured_bytes=measured["peak_bytes"]))
    return profile, rows


def cpu_report(*, markdown: bool = False) -> str:
    profile, rows = cpu_rows()
    lines = [f"CPU profile: fp32 peak {profile.peak_flops / 1e9:.1f} GFLOP/s, GEMM d_half "
             f"{profile.gemm_half_efficiency_dim:.0f}, bandwidth {profile.memory_bandwidth / 1e9:.1f} GB/s, "
             f"dispatch {profile.op_dispatch_s * 1e6:.1f} µs/op, {profile.threads} threads", ""]
    lines.append("| model | batch | predicted step s | measured step s | error | predicted peak MiB | "
                 "measured peak MiB | error |")
    lines.append("|" + "---|" * 8)
    for r in rows:
        lines.append(f"| {r.preset} | {r.batch} | {r.predicted_s:.4f} | {r.measured_s:.4f} | {r.time_error:+.1%} | "
                     f"{r.predicted_bytes / MiB:.1f} | {r.measured_bytes / MiB:.1f} | {r.memory_error:+.1%} |")
    return "\n".join(lines)
