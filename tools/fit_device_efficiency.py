"""Fit one device's sustained GEMM efficiency to measured runs where compute dominates.

The cost model's ``gemm_efficiency_max`` (0.8) was set against Megatron-LM's A100 runs. Another device
keeps a different fraction of its datasheet peak through a training step (clocks under its power limit,
tiles and waves sized for more SMs), so a cluster file can state its own ``device.gemm_efficiency``.
This fits it for one device name on the runs of that device that span a single node (no network:
what is left is compute and NVLink), and reports the fit on the rows it did not use, so the value
is checked on runs it never saw:

    python -m tools.fit_device_efficiency --device H100-SXM5-80GB

Fit set: the sweep's one-node groups (``--fit-groups``), their healthy configurations (>= 25% of the
group's best); objective: the median |log(predicted / measured step time)|. The same value is then
priced on every published run of that device.
"""

from __future__ import annotations

import argparse
import math
import statistics

from planner.validation.cases import load_cases
from planner.validation.metrics import healthy
from planner.validation.price import Priced, validate_cases


def _log_errors(priced: list[Priced]) -> list[float]:
    by_group: dict[str, list[Priced]] = {}
    for p in priced:
        if p.case.status == "ok" and p.step_ratio:
            by_group.setdefault(p.case.group, []).append(p)
    out = []
    for rows in by_group.values():
        ok = healthy([r.case.measured_tokens_per_s_per_gpu for r in rows])
        out += [abs(math.log(r.step_ratio)) for r, h in zip(rows, ok) if h]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.fit_device_efficiency", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="H100-SXM5-80GB", help="the device name the clusters use")
    ap.add_argument("--fit-groups", default="playbook-1B:8,playbook-3B:8",
                    help="sweep groups to fit on (comma-separated; one node each)")
    ap.add_argument("--grid", default="0.40:0.81:0.02", help="start:stop:step of the values tried")
    args = ap.parse_args(argv)
    start, stop, step = (float(x) for x in args.grid.split(":"))
    grid = [round(start + i * step, 4) for i in range(int((stop - start) / step) + 1)]
    cases = load_cases("all").cases
    fit_groups = set(args.fit_groups.split(","))
    fit = [c for c in cases if c.group in fit_groups]
    check = [c for c in cases if c.source == "published" and c.cluster.preset == "dgx-h100"]
    if not fit:
        raise SystemExit(f"--fit-groups: no case in {sorted(fit_groups)}")
    rows = []
    for value in grid:
        over = {args.device: {"gemm_efficiency": value}}
        errs = _log_errors(validate_cases(fit, device_overrides=over).priced)
        rows.append((statistics.median(errs), value, len(errs)))
    best_err, best, n = min(rows)
    print(f"device {args.device}: gemm_efficiency fitted on {n} healthy configurations of {sorted(fit_groups)}")
    print("| gemm_efficiency | median abs(log(pred/meas)) on the fit set |\n|---|---|")
    for err, value, _ in rows:
        print(f"| {value:.2f}{' (best)' if value == best else ''} | {err:.3f} |")
    for label, value in (("without the field (the constant's 0.8)", None), (f"fitted {best:.2f}", best)):
        over = {args.device: {"gemm_efficiency": value}}
        priced = validate_cases(check, device_overrides=over).priced
        ratios = [p.step_ratio for p in priced if p.step_ratio]
        within = sum(abs(r - 1) <= 0.15 for r in ratios)
        print(f"published {args.device} runs (not fitted), {label}: median pred/meas "
              f"{statistics.median(ratios):.2f}, within 15%: {within}/{len(ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
