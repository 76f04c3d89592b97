"""Points of the planner-cost sweep: ``plan()`` wall time and the memory it adds, one JSON line each.

    python -m bench.point --model gpt3-175b --cluster dgx-a100-80g --nodes 128 --global-batch 1536
    python -m bench.point --model gpt3-6.7b --layers 48 --cluster dgx-a100-80g --nodes 16 --global-batch 512

``--nodes`` and ``--layers`` take several values (one point each, in this process); the full
bench starts one process per point so each point's memory is its own.

Memory: the process's resident-set high-water mark (``VmHWM``) is reset just before ``plan()``
(Linux ``/proc/self/clear_refs``, value 5), so ``peak_delta_mib`` is the most memory ``plan()``
added on top of what the process already held (imports, the model on meta). ``peak_rss_mib`` is
the process's peak over its life, imports included, from ``VmHWM`` read before the reset and after
the call. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is not used for it: Linux carries that
value over from the parent across ``fork`` and ``exec``, so a child of a large bench process
reports the parent's peak. Where ``/proc`` is not available, both fall back to ``getrusage``
(``hwm_reset`` false) and the delta can read 0 for small problems.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(model: str, cluster: str, *, global_batch: int, nodes: int | None = None,
            layers: int | None = None) -> dict:
    """Plan once and return the timings and memory of that call."""
    from planner import plan
    from planner.api import resolve_cluster
    from planner.errors import PlannerError
    from planner.models import load_preset

    preset = load_preset(model)
    if layers:
        preset = replace(preset, name=f"{preset.name}-{layers}L", config={**preset.config, "num_layers": layers})
    module = preset.build(device="meta")
    sample = preset.sample_input(1)
    out: dict = {"model": preset.name, "cluster": cluster, "nodes": nodes, "blocks": layers,
                 "global_batch": global_batch, "gpus": resolve_cluster(cluster, nodes=nodes).num_devices}
    rss_before = _status_mib("VmRSS")
    hwm_before = _status_mib("VmHWM")
    reset = _reset_hwm()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    try:
        p = plan(module, cluster, nodes=nodes, global_batch=global_batch, sample_input=sample)
        out.update(feasible=True, config=p.parallel.label(), step_time_s=p.predicted.step_time_s,
                   layers=p.model.num_layers, evaluated=p.search.get("evaluated"), **p.timings)
    except PlannerError as exc:
        out.update(feasible=False, reason=str(exc).split(". ")[0][:200])
    out["wall_s"] = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    hwm = _status_mib("VmHWM")
    out["hwm_reset"] = bool(reset and hwm is not None and rss_before is not None and hwm_before is not None)
    if out["hwm_reset"]:
        out["peak_delta_mib"] = max(0.0, hwm - rss_before)
        out["peak_rss_mib"] = max(hwm_before, hwm)
    else:
        out["peak_delta_mib"] = peak - maxrss_before
        out["peak_rss_mib"] = peak
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.point", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", type=int, nargs="*", default=[None],
                        help="rebuild the preset with these many transformer blocks (one point each)")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--nodes", type=int, nargs="*", default=[None], help="one point per value")
    parser.add_argument("--global-batch", type=int, required=True)
    args = parser.parse_args(argv)
    for nodes in args.nodes:
        for layers in args.layers:
            print(json.dumps(measure(args.model, args.cluster, global_batch=args.global_batch, nodes=nodes,
                                     layers=layers)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
