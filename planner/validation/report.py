"""What ``python -m planner validate`` prints: aligned text tables, a JSON object, a CSV of every case.

Text, not a rich table, so that the output pastes into docs unchanged. Deterministic except for
the one timing line at the end (left out of ``--json``).
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path
from typing import Any

from planner.errors import SpecError
from planner.validation.price import GroupSummary, Priced, Validation

TARGETS = (  # (key in Validation.overall, label, comparison, target, source)
    ("top1_median", "top-1, median over groups", ">=", 0.95, "sweep"),
    ("top1_min", "top-1, worst group", ">=", 0.85, "sweep"),
    ("spearman_median", "Spearman, median over groups", ">=", 0.85, "sweep"),
    ("error_median", "error |pred/meas - 1|, median over groups", "<=", 0.10, "sweep"),
    ("fit_ok", "runs that ran, predicted to fit", ">=", 0.95, "sweep"),
    ("fit_failed", "failed runs, predicted not to fit", None, None, "sweep"),
    ("within_15", "published runs within 15%", ">=", 0.85, "published"),
    ("fit_ok", "published runs predicted to fit", ">=", 0.95, "published"),
)
_PERCENT = {"error_median", "fit_ok", "fit_failed", "within_15"}


def _f(x: float, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pct(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.0%}"


def group_table(groups: list[GroupSummary]) -> list[str]:
    head = (f"{'group':<24} {'ok':>4} {'fail':>4} {'hlth':>4} {'top-1':>6} {'rho':>6} {'error':>6} "
            f"{'pred/meas':>9} {'fit ok':>6} {'fail->no':>8}  planner's pick (best measured)")
    lines = [head, "-" * len(head)]
    for g in groups:
        pick = g.top1_pick if g.top1_pick == g.best else f"{g.top1_pick} ({g.best})"
        lines.append(f"{g.group:<24} {g.configs_ok:>4} {g.configs_failed:>4} {g.healthy:>4} {_f(g.top1):>6} "
                     f"{_f(g.spearman, '.2f'):>6} {_pct(g.error):>6} {_f(g.median_ratio, '.2f'):>9} "
                     f"{_pct(g.fit_ok):>6} {_pct(g.fit_failed):>8}  {pick}")
    return lines


def targets_table(v: Validation, sources: tuple[str, ...]) -> list[str]:
    lines = [f"{'metric':<44} {'value':>7}  target   met"]
    overall = {s: v.overall(s) for s in sources}
    for key, label, op, target, source in TARGETS:
        if source not in overall:
            continue
        value = overall[source][key]
        shown = _pct(value) if key in _PERCENT else _f(value)
        if op is None:
            lines.append(f"{label:<44} {shown:>7}  -        -")
            continue
        met = not math.isnan(value) and (value >= target if op == ">=" else value <= target)
        goal = f"{op} {target:.0%}" if key in _PERCENT else f"{op} {target:.2f}"
        lines.append(f"{label:<44} {shown:>7}  {goal:<8} {'yes' if met else 'NO'}")
    return lines


def published_table(runs: list[Priced]) -> list[str]:
    head = (f"{'run':<62} {'GPUs':>5} {'meas tok/s/gpu':>14} {'pred':>8} {'pred/meas':>9} {'fits':>4}  "
            "configuration")
    lines = [head, "-" * len(head)]
    for p in sorted(runs, key=lambda p: p.case.case_id):
        lines.append(f"{p.case.case_id[:62]:<62} {p.case.gpus:>5} {p.case.measured_tokens_per_s_per_gpu:>14.5g} "
                     f"{p.predicted_tokens_per_s_per_gpu:>8.5g} {_f(p.step_ratio, '.2f'):>9} "
                     f"{'yes' if p.fits else 'NO':>4}  {p.case.config.label()}")
    return lines


def skip_table(v: Validation, skipped_on_load: list[Any]) -> list[str]:
    counts: dict[tuple[str, str], int] = {}
    for s in list(skipped_on_load) + v.skipped:
        counts[(s.source, s.reason)] = counts.get((s.source, s.reason), 0) + 1
    lines = [f"{'count':>5}  source     reason"]
    for (source, reason), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1])):
        lines.append(f"{n:>5}  {source:<10} {reason}")
    return lines


def text_report(v: Validation, sources: tuple[str, ...], skipped_on_load: list[Any],
                files: dict[str, str] | None = None) -> str:
    """The tables ``validate`` prints; ``files`` names the data file of each source (default: the shared
    data in datasets/measured)."""
    files = {"sweep": "datasets/measured/h100_sweep.json", "published": "datasets/measured/published_runs.json",
             **(files or {})}
    out: list[str] = []
    if "sweep" in sources and v.of("sweep"):
        n = len(v.of("sweep"))
        out += [f"Sweep ({files['sweep']}): {n} configurations priced, per (model, GPUs) group.",
                "top-1: measured throughput of the planner's first choice / best measured; rho: Spearman on the "
                "healthy (>= 25% of best) configurations;",
                "error: median |predicted/measured step time - 1| on them; pred/meas: median step-time ratio "
                "(< 1: predicted too fast); fit ok: ran and",
                "predicted to fit; fail->no: crashed/OOM and predicted not to fit.", ""]
        out += group_table(v.groups("sweep")) + [""]
    if "published" in sources and v.of("published"):
        out += [f"Published runs ({files['published']}): {len(v.of('published'))} priced; "
                "pred/meas is the step-time ratio.", ""]
        out += published_table(v.of("published")) + [""]
    out += ["Targets (issue 21):"] + targets_table(v, sources) + [""]
    out += ["Skipped:"] + skip_table(v, skipped_on_load) + [""]
    out.append(f"Traced {v.trace_s:.1f} s, priced {len(v.priced)} configurations in {v.price_s:.1f} s.")
    return "\n".join(out)


def json_report(v: Validation, sources: tuple[str, ...], skipped_on_load: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sources:
        overall = {k: (None if isinstance(x, float) and math.isnan(x) else x) for k, x in v.overall(s).items()}
        entry: dict[str, Any] = {"overall": overall}
        if s == "sweep":
            entry["groups"] = [g.to_dict() for g in v.groups(s)]
        entry["runs"] = [case_row(p) for p in v.of(s)]
        out[s] = entry
    out["skipped"] = [dataclasses.asdict(x) for x in list(skipped_on_load) + v.skipped]
    return out


CSV_FIELDS = ("source", "case_id", "group", "config", "status", "measured_from", "measured_tokens_per_s_per_gpu",
              "predicted_tokens_per_s_per_gpu", "step_ratio", "fits", "peak_memory_gib", "notes")


def case_row(p: Priced) -> dict[str, Any]:
    c = p.case
    return {"source": c.source, "case_id": c.case_id, "group": c.group, "config": c.config.label(),
            "status": c.status, "measured_from": c.measured_from,
            "measured_tokens_per_s_per_gpu": c.measured_tokens_per_s_per_gpu,
            "predicted_tokens_per_s_per_gpu": round(p.predicted_tokens_per_s_per_gpu, 3),
            "step_ratio": None if p.step_ratio is None else round(p.step_ratio, 5), "fits": p.fits,
            "peak_memory_gib": round(p.peak_memory_gib, 3), "notes": "; ".join(p.notes)}


def write_csv(v: Validation, path: str | Path) -> Path:
    path = Path(path)
    try:
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            w.writeheader()
            for p in v.priced:
                w.writerow(case_row(p))
    except OSError as exc:
        raise SpecError("--csv", str(path), f"cannot write it ({exc.strerror}); pick a writable path") from exc
    return path
