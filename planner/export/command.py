"""``python -m planner export PLAN --to FRAMEWORK -o DIR``: arguments and the command (registered in :mod:`planner.cli`)."""

from __future__ import annotations

import argparse
import json

from planner.export import FRAMEWORKS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", help="plan JSON file")
    p.add_argument("--to", required=True, metavar="{" + ",".join(FRAMEWORKS) + "}",
                   help="the framework whose configuration to write")
    p.add_argument("-o", "--output", required=True, help="folder to write the files and LOST.md into")
    p.add_argument("--force", action="store_true", help="overwrite files that exist in the folder")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def run(args: argparse.Namespace) -> int:
    from planner.export import export_plan
    from planner.output_paths import check_output_folder
    from planner.plan import Plan

    check_output_folder("--output", args.output, force=True)  # a file, or under one: refused before pricing
    plan = Plan.from_json(args.plan)
    result = export_plan(plan, args.to)
    files = {**result.files, "LOST.md": result.lost_markdown()}
    out = check_output_folder("--output", args.output, force=args.force, files=files)  # only these are overwritten
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    if args.json:
        print(json.dumps({
            "framework": result.framework, "version": result.version, "files": sorted(str(out / n) for n in files),
            "kept": result.kept, "lost": [vars(x) for x in result.lost], "plan_step_s": result.plan_step_s,
            "nearest": result.nearest.label() if result.nearest else None,
            "nearest_stage_layers": [b - a for a, b in result.nearest_boundaries] if result.nearest_boundaries else None,
            "nearest_step_s": result.nearest_step_s, "nearest_fits": result.nearest_fits}, indent=2))
        return 0
    for line in result.summary_lines():
        print(line)
    print(f"wrote {', '.join(str(out / n) for n in files)}")
    return 0
