"""Benchmark sections. Each returns Markdown, including the numbers it measured."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable


def _plan_time(model: str, cluster: str, nodes: int, global_batch: int) -> tuple[float, object]:
    from planner import plan

    start = time.perf_counter()
    p = plan(model, cluster, nodes=nodes, global_batch=global_batch)
    return time.perf_counter() - start, p


def planning_speed(*, quick: bool = False) -> str:
    """Wall time of `plan` for the headline cases (the issue targets: 175B/1024 < 10 s, 1T/3072 < 30 s)."""
    cases = [("gpt3-175b", "dgx-a100-80g", 128, 1536), ("megatron-1t", "dgx-a100-80g", 384, 3072)]
    if quick:
        cases = cases[:1]
    rows = ["## Planning speed\n", "| model | cluster | GPUs | global batch | plan wall time (s) | chosen configuration "
            "| predicted step (s) | MFU |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, cluster, nodes, gb in cases:
        took, p = _plan_time(model, cluster, nodes, gb)
        rows.append(f"| {model} | {cluster} | {nodes * 8} | {gb} | {took:.2f} | {p.parallel.label()} | "
                    f"{p.predicted.step_time_s:.2f} | {p.predicted.mfu:.1%} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rows.append(f"\nPeak resident memory of the benchmark process: {peak:.0f} MiB.")
    return "\n".join(rows)


SECTIONS: dict[str, Callable[..., str]] = {
    "planning_speed": planning_speed,
}
