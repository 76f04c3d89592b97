"""This CPU, profiled and measured: the micro-benchmarks behind :class:`planner.cost.cpu_calibration.CpuProfile`,
and training steps the calibrated prediction is checked against (``python -m tools.calibrate --cpu``).

Profiled calibration (micro-benchmarks of the machine, never of the models we then predict):

* GEMM: fp32 ``torch.mm`` at square and skinny shapes; the fastest large one sets the device's
  fp32 peak, and ``gemm_half_efficiency_dim`` is the least-squares fit of
  ``eff(m, n, k) = Π d/(d + d_half)`` to the rest.
* Memory-bound ops: a mix of the element-wise ops a transformer runs (add, mul, GeLU, softmax,
  log-softmax, layer norm, masked fill, transpose copy) on 4 MiB tensors sets the effective
  bandwidth, bytes as the trace counts them over CPU seconds (on a CPU these ops are as much
  compute-bound as memory-bound, which the mix captures).
* Dispatch: a forward + backward of a tiny op chain gives the host time per op.
* Loss: cross-entropy forward + backward on 8 and 32 MiB of fp32 logits, expressed as passes over
  the logits at the measured bandwidth (big fresh tensors also pay for page faults on first touch,
  which the element-wise mix on 4 MiB tensors does not see).
* Optimizer: one torch AdamW step over 1M parameters gives the seconds per parameter.

Measured: a single-process training step (forward, cross-entropy loss, backward, AdamW) of
gpt-tiny and gpt-10m with plain torch on one intra-op thread, the least CPU time (process time, as
for the micro-benchmarks: the machine is shared, and the minimum is the least disturbed run) of
several steps after warm-up; peak memory as tensor memory, the CPU analogue of
``torch.cuda.max_memory_allocated`` (weights and optimizer state between steps plus the peak of one
step's allocations, from the profiler's memory events), in a fresh subprocess per model
(``python -m bench.cpu_calibration PRESET BATCH STEPS`` prints it as JSON). Not the process's
resident set: what the C allocator keeps from earlier work in the process makes it wander by tens of
MiB, and the model leaves such allocator overhead to its allocator margin. Predicted:
:func:`planner.api.evaluate` on a one-device cpu-local cluster with the calibrated constants
(:func:`planner.cost.cpu_calibration.cpu_constants`), i.e. what ``python -m planner evaluate`` computes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from planner.cost.cpu_calibration import CpuProfile, cpu_cluster, cpu_constants

REPO = Path(__file__).resolve().parents[1]
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


def profile_cpu() -> CpuProfile:
    """Run the micro-benchmarks (a few seconds) on one intra-op thread, as the measured runs use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _profile()
    finally:
        torch.set_num_threads(threads)


def _gemm_fit() -> tuple[float, float]:
    """This machine's GEMM curve: (the fitted curve's peak FLOP/s, its half-efficiency dimension)."""
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
    return r / ((m / (m + best)) * (n / (n + best)) * (k / (k + best))), best


def _elementwise_bandwidth() -> float:
    """Bytes/s of the ops a transformer's memory-bound share is made of, on 4 MiB tensors, counted as
    the trace counts them (bytes read + written)."""
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
    return moved / spent


def _profile() -> CpuProfile:
    torch.manual_seed(0)
    peak_fit, best = _gemm_fit()
    bandwidth = _elementwise_bandwidth()
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


def measure_in_this_process(preset_name: str, batch: int, steps: int) -> dict:
    """Profile the machine, then time ``steps`` training steps of ``preset_name`` at ``batch`` and take
    its peak tensor memory, in this process (:func:`measure_step` runs it in a fresh one)."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from planner.models import load_preset

    torch.set_num_threads(1)
    torch.manual_seed(0)
    p = load_preset(preset_name)
    # Calibrate right before measuring, in the same process: a shared machine's speed drifts.
    machine = profile_cpu()
    model = p.build(device="cpu").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, p.config["vocab_size"], (batch, p.seq_len), generator=gen)
    targets = torch.randint(0, p.config["vocab_size"], (batch, p.seq_len), generator=gen)

    def step() -> None:
        logits = model(tokens)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(steps + 2):
        start = time.process_time()
        step()
        if i >= 2:
            times.append(time.process_time() - start)
    # Tensor memory (the CPU analogue of torch.cuda.max_memory_allocated): what lives between steps
    # (weights, optimizer state) plus the peak of one step's allocations, from the profiler's events.
    # step() keeps nothing of a step alive after it returns.
    live = sum(q.numel() * q.element_size() for q in model.parameters())
    live += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                if isinstance(t, torch.Tensor))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    cur = top = 0
    for _, nbytes in events:
        cur += nbytes
        top = max(top, cur)
    return {"step_s": min(times), "peak_bytes": live + top, "threads": torch.get_num_threads(),
            "profile": dataclasses.asdict(machine)}


def measure_step(preset: str, batch: int, *, steps: int = 5) -> dict:
    """Least training-step CPU seconds and peak tensor bytes of ``preset`` at ``batch``, and the
    machine profile taken just before, in a fresh Python process."""
    out = subprocess.run([sys.executable, "-m", "bench.cpu_calibration", preset, str(batch), str(steps)],
                         check=True, capture_output=True, text=True, cwd=REPO)
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


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.cpu_calibration PRESET BATCH STEPS``: one JSON line (what :func:`measure_step` reads)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m bench.cpu_calibration PRESET BATCH STEPS", file=sys.stderr)
        return 2
    print(json.dumps(measure_in_this_process(args[0], int(args[1]), int(args[2]))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
