"""The run report: per-step loss and time, per-rank memory, next to the plan's predictions.

Rank 0 writes it as JSON (``--out``) and prints a small table. Measured step time is the slowest
rank's wall time per step (the median over steps, leaving out the first, which includes warm-up);
measured memory is ``torch.cuda.max_memory_allocated`` on GPUs and the process's peak RSS on the
CPU (which includes the Python interpreter and torch itself, ~0.3-0.5 GB, that the planner does not
count; ``model_state_bytes`` is the exact size of this rank's weights, gradients and optimizer state).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from planner.plan import Plan
from runtime.train import RunOptions, RunResult, median_step_time_s

MiB = 2**20


def build_report(plan: Plan, plan_path: str, options: RunOptions, result: RunResult, launch) -> dict[str, Any]:
    pred = plan.predicted
    measured_step = median_step_time_s(result.step_times_s) if result.step_times_s else None  # --steps 0: none
    per_device = list(pred.memory_per_device_bytes)
    ranks = []
    for m in result.ranks:
        ranks.append({
            "rank": m.rank, "coords": m.coords, "stages": m.stages, "step_times_s": m.step_times_s,
            "median_step_time_s": median_step_time_s(m.step_times_s) if m.step_times_s else None,
            "peak_memory_bytes": m.peak_memory_bytes,
            "memory_kind": m.memory_kind, "model_state_bytes": m.model_state_bytes,
            "predicted_memory_bytes": per_device[m.rank] if m.rank < len(per_device) else None,
        })
    peak = max((r["peak_memory_bytes"] for r in ranks), default=0)
    return {
        "plan": {"path": str(plan_path), "model": plan.model.name, "fingerprint": plan.model.fingerprint,
                 "parallel": plan.parallel.label(), "schema_version": plan.schema_version},
        "run": {"world_size": launch.world_size, "nodes": launch.nodes, "procs_per_node": launch.procs_per_node,
                "device": launch.device_type, "backend": "nccl" if launch.device_type == "cuda" else "gloo",
                "steps": options.steps, "first_step": result.first_step, "seed": options.seed, "lr": options.lr,
                "torch": torch.__version__, "host": platform.node(), **result.setup},
        "steps": [{"step": result.first_step + i + 1, "loss": loss, "grad_norm": g, "step_time_s": t}
                  for i, (loss, g, t) in enumerate(zip(result.losses, result.grad_norms, result.step_times_s))],
        "ranks": ranks,
        "predicted": {"step_time_s": pred.step_time_s, "peak_memory_bytes": pred.peak_memory_bytes,
                      "memory_per_device_bytes": per_device, "mfu": pred.mfu},
        "measured": {"step_time_s": measured_step, "peak_memory_bytes": peak,
                     "memory_kind": ranks[0]["memory_kind"] if ranks else "",
                     "max_model_state_bytes": max((r["model_state_bytes"] for r in ranks), default=0)},
        "measured_over_predicted": {
            "step_time": measured_step / pred.step_time_s if pred.step_time_s and measured_step is not None else None,
            "peak_memory": peak / pred.peak_memory_bytes if pred.peak_memory_bytes else None,
        },
        "checkpoints": result.checkpoints,
    }


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'rank':>4} {'pp':>3} {'dp':>3} {'tp':>3} {'stages':>8} {'step s (median)':>16} "
             f"{'peak MiB':>9} {'state MiB':>9} {'planned MiB':>11}"]
    for r in report["ranks"]:
        planned = r["predicted_memory_bytes"]
        lines.append(f"{r['rank']:>4} {r['coords']['pp']:>3} {r['coords']['dp']:>3} {r['coords']['tp']:>3} "
                     f"{','.join(map(str, r['stages'])):>8} {_seconds(r['median_step_time_s']):>16} "
                     f"{r['peak_memory_bytes'] / MiB:>9.1f} {r['model_state_bytes'] / MiB:>9.1f} "
                     f"{(planned or 0) / MiB:>11.1f}")
    p, m, ratio = report["predicted"], report["measured"], report["measured_over_predicted"]
    lines.append(f"predicted vs measured step time: {p['step_time_s']:.4f} s vs "
                 + (f"{m['step_time_s']:.4f} s" if m["step_time_s"] is not None else "not measured (no step ran)")
                 + (f" (x{ratio['step_time']:.2f})" if ratio["step_time"] else ""))
    lines.append(f"predicted vs measured peak memory: {p['peak_memory_bytes'] / MiB:.1f} MiB vs "
                 f"{m['peak_memory_bytes'] / MiB:.1f} MiB ({m['memory_kind']}); largest weights+grads+optimizer "
                 f"state on one rank: {m['max_model_state_bytes'] / MiB:.1f} MiB")
    if report["steps"]:
        lines.append(f"loss: step {report['steps'][0]['step']} {report['steps'][0]['loss']:.6f} -> step "
                     f"{report['steps'][-1]['step']} {report['steps'][-1]['loss']:.6f}")
    return "\n".join(lines)


def _seconds(x: float | None) -> str:
    return f"{x:.4f}" if x is not None else "-"


def write_report(plan: Plan, plan_path: str, options: RunOptions, result: RunResult, launch, *,
                 out: str | None, verbose: bool = True) -> dict[str, Any]:
    report = build_report(plan, plan_path, options, result, launch)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    if verbose:
        print(format_table(report) + (f"\nmetrics written to {out}" if out else ""), flush=True)
    return report
