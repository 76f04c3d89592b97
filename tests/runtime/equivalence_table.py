"""Print the tables of docs/runtime.md: numerical equivalence, and measured vs predicted on the CPU.

    .venv/bin/python tests/runtime/equivalence_table.py            # both tables, markdown, ~2 minutes

1. Every plan of ``WORLD2`` and ``WORLD4`` (runtime_plans.py) trains gpt-tiny for 5 AdamW steps in fp32
   on gloo; the table gives the largest |loss difference| and relative gradient-norm difference to a
   plain single-process PyTorch loop on the same seed and data.
2. Plans priced by the planner (``planner.api.evaluate`` on cpu-local) are run and their predicted step
   time and peak memory are put next to what was measured (median step of the slowest rank without
   the first step; peak RSS of the whole process, and the exact weights+gradients+optimizer bytes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from runtime_harness import LR, STEPS, Job, job_for, run_jobs, run_reference  # noqa: E402
from runtime_plans import WORLD2, WORLD4, make_plan, tiny_preset  # noqa: E402

from runtime.launch import launch_workers  # noqa: E402

MiB = 2**20


def equivalence_rows(steps: int, only: tuple[str, ...] = ()) -> list[str]:
    """``only``: the plans whose name contains one of these (all when empty)."""
    refs = launch_workers(1, run_reference, [
        (False, make_plan(num_micro_batches=4), tiny_preset("gpt-tiny", None), LR),
        (True, make_plan(num_micro_batches=4, tie=True), tiny_preset("gpt-tiny", True), LR)], steps)[0]
    rows = ["| plan (gpt-tiny, global batch 8, fp32, gloo) | ranks | max abs loss diff | max rel grad-norm diff | "
            "median step s |", "|---|---|---|---|---|"]
    for nproc, table in ((2, WORLD2), (4, WORLD4)):
        table = {n: s for n, s in table.items() if not only or any(o in n for o in only)}
        if not table:
            continue
        results = launch_workers(nproc, run_jobs, [job_for(n, s, steps) for n, s in table.items()])[0]
        for name, spec in table.items():
            r = results[name]
            ref_losses, ref_norms = refs[spec.get("tie", False) is True]
            loss_diff = max(abs(a - b) for a, b in zip(r.losses, ref_losses))
            norm_diff = max(abs(a / b - 1) for a, b in zip(r.grad_norms, ref_norms))
            rows.append(f"| {name} | {nproc} | {loss_diff:.1e} | {norm_diff:.1e} | "
                        f"{statistics.median(r.step_times_s[1:]):.3f} |")
    return rows


def predicted_rows(steps: int) -> list[str]:
    from planner.api import evaluate
    from planner.plan import ParallelConfig

    configs = {
        "gpt-tiny pp=2 1f1b mb 2x4": ("gpt-tiny", ParallelConfig(pp=2, micro_batch_size=2, num_micro_batches=4)),
        "gpt-tiny dp=2 mb 2x2": ("gpt-tiny", ParallelConfig(dp=2, micro_batch_size=2, num_micro_batches=2)),
        "gpt-tiny tp=2 mb 2x4": ("gpt-tiny", ParallelConfig(tp=2, micro_batch_size=2, num_micro_batches=4)),
        "gpt-10m pp=2 1f1b mb 2x4": ("gpt-10m", ParallelConfig(pp=2, micro_batch_size=2, num_micro_batches=4)),
    }
    jobs = []
    for name, (model, cfg) in configs.items():
        plan = evaluate(model, "cpu-local", cfg, devices_per_node=2, dtype="fp32")
        jobs.append(Job(name, plan, steps=steps))
    per_rank = launch_workers(2, run_jobs, jobs)
    rows = ["| plan (planner.api.evaluate, cpu-local x2) | predicted step s | measured step s | ratio | "
            "predicted peak MiB | measured state MiB (max rank) | measured peak RSS MiB (max rank) |",
            "|---|---|---|---|---|---|---|"]
    for job in jobs:
        pred = job.plan.predicted
        measured = statistics.median(per_rank[0][job.name].step_times_s[1:])
        state = max(per_rank[r][job.name].model_state_bytes for r in per_rank)
        rss = max(per_rank[r][job.name].peak_memory_bytes for r in per_rank)
        rows.append(f"| {job.name} | {pred.step_time_s:.3f} | {measured:.3f} | x{measured / pred.step_time_s:.2f} | "
                    f"{pred.peak_memory_bytes / MiB:.1f} | {state / MiB:.1f} | {rss / MiB:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--skip-predicted", action="store_true", help="only the equivalence table")
    parser.add_argument("--only", default="", help="comma-separated parts of plan names: run only those plans")
    args = parser.parse_args()
    print("\n".join(equivalence_rows(args.steps, tuple(o for o in args.only.split(",") if o))))
    if not args.skip_predicted:
        print()
        print("\n".join(predicted_rows(args.steps)))


if __name__ == "__main__":
    main()
