"""One point of the planner-cost sweep, in its own process so that its peak memory is its own.

    python -m bench.point --model gpt3-175b --cluster dgx-a100-80g --nodes 128 --global-batch 1536
    python -m bench.point --model gpt3-6.7b --layers 48 --cluster dgx-a100-80g --nodes 16 --global-batch 512

Prints one JSON object: wall time of ``planner.plan`` (trace + search + baselines) and the peak
resident memory of the process before and after the call (``resource.getrusage``), so the
difference is what planning added on top of the imported libraries.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import replace


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.point", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--layers", type=int, help="rebuild the preset with this many transformer blocks")
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--global-batch", type=int, required=True)
    args = parser.parse_args(argv)

    from planner import plan
    from planner.api import resolve_cluster
    from planner.errors import PlannerError
    from planner.models import load_preset

    preset = load_preset(args.model)
    if args.layers:
        preset = replace(preset, name=f"{preset.name}-{args.layers}L",
                         config={**preset.config, "num_layers": args.layers})
    model = preset.build(device="meta")
    sample = preset.sample_input(1)
    before = _rss_mib()
    start = time.perf_counter()
    out: dict = {"model": preset.name, "cluster": args.cluster, "nodes": args.nodes,
                 "global_batch": args.global_batch,
                 "gpus": resolve_cluster(args.cluster, nodes=args.nodes).num_devices}
    try:
        p = plan(model, args.cluster, nodes=args.nodes, global_batch=args.global_batch, sample_input=sample)
        out.update(feasible=True, config=p.parallel.label(), step_time_s=p.predicted.step_time_s,
                   layers=p.model.num_layers, evaluated=p.search.get("evaluated"), **p.timings)
    except PlannerError as exc:
        out.update(feasible=False, error=str(exc).split(". ")[0][:200])
    out["wall_s"] = time.perf_counter() - start
    out["rss_before_mib"] = before
    out["peak_rss_mib"] = _rss_mib()
    out["peak_delta_mib"] = out["peak_rss_mib"] - before
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
