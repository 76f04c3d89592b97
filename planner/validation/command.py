"""``python -m planner validate``: arguments and the command (registered in :mod:`planner.cli`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", choices=["sweep", "published", "all"], default="all",
                   help="which measured data: the H100 sweep, the published runs, or both (default)")
    p.add_argument("--sweep", metavar="FILE",
                   help="a measured sweep in the format of datasets/measured/h100_sweep.json (default: that file): "
                        "its runs, models, cluster (GPU, GPUs per node, measured bus bandwidths) and training "
                        "settings")
    p.add_argument("--published", metavar="FILE",
                   help="published runs in the format of datasets/measured/published_runs.json (default: that "
                        "file)")
    p.add_argument("--group", metavar="MODEL:GPUS", help="only this group, e.g. playbook-1B:64")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--csv", metavar="FILE", help="also write every priced case to this CSV file")
    p.add_argument("--force", action="store_true", help="overwrite the --csv file if it exists")
    p.add_argument("--network", choices=["file", "busbw"], default="file",
                   help="the sweep cluster's network: its file as is, measured collectives included (default), or "
                        "busbw: inter-node bandwidth set to the all-reduce bus bandwidth measured at each node count")
    p.add_argument("--constants", metavar="FILE",
                   help="JSON object of cost-model constants to override (fields of CostConstants)")
    p.add_argument("--write-bands", action="store_true",
                   help="write the per-regime error bands plans carry (datasets/measured/error_bands.json); "
                        "needs the whole data set and the default constants")


def load_overrides(path: str | None) -> dict[str, Any]:
    """The constants a ``--constants`` file sets (none without one), checked."""
    from planner.cost.constants import constant_fields_from_file

    return {} if path is None else constant_fields_from_file(path)


def run(args: argparse.Namespace) -> int:
    from planner.errors import SpecError
    from planner.validation.cases import load_cases
    from planner.validation.price import validate_cases
    from planner.validation.report import json_report, text_report, write_csv

    if args.csv:  # before pricing: a wrong path fails now, an existing file is kept
        from planner.output_paths import check_output_file

        check_output_file("--csv", args.csv, force=args.force)
    overrides = load_overrides(args.constants)
    files = {k: v for k, v in (("sweep", args.sweep), ("published", args.published)) if v}
    for kind in files:
        if args.source not in (kind, "all"):
            raise SpecError(f"--{kind}", files[kind], f"--source {args.source} leaves the {kind} data out: use "
                            f"--source {kind} or all")
    loaded = load_cases(args.source, sweep_path=Path(args.sweep) if args.sweep else None,
                        published_path=Path(args.published) if args.published else None)
    cases = loaded.cases
    if args.group:
        cases = [c for c in cases if c.group == args.group]
        if not cases:
            known = sorted({c.group for c in loaded.cases if c.source == "sweep"})
            raise SpecError("--group", args.group, f"no such group; sweep groups are {known} "
                            "(published runs are grouped by model name and GPUs)")
    if args.write_bands and (args.group or args.source != "all" or args.constants or args.network != "file"
                             or files):
        raise SpecError("--write-bands", True, "the bands come from every case of the shared data with the default "
                        "constants and network: drop --group, --source, --sweep, --published, --constants and "
                        "--network")
    if not cases:
        names = ", ".join(files.values()) or "the shared data"
        raise SpecError("--source", args.source, f"no runs in {names} could be priced (every one was skipped: "
                        f"{_reasons(loaded.skipped)}); see docs/validation.md for the formats")
    result = validate_cases(cases, network=args.network, overrides=overrides)
    if args.write_bands:
        from planner.uncertainty import write_bands

        path = write_bands(result.residual_bands(), "python -m planner validate --write-bands")
        print(f"error bands written to {path}")
    sources = ("sweep", "published") if args.source == "all" else (args.source,)
    skipped = [] if args.group else loaded.skipped
    if args.csv:
        write_csv(result, args.csv)
    if args.json:
        print(json.dumps(json_report(result, sources, skipped), indent=2))
    else:
        print(text_report(result, sources, skipped, files))
        if args.csv:
            print(f"every case written to {args.csv}")
    return 0


def _reasons(skipped: list[Any]) -> str:
    """The skip reasons, most frequent first (the three commonest)."""
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:3]
    return "; ".join(f"{n} x {reason}" for reason, n in top) or "the file holds none"
