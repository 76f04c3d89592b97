"""The calibration tables of docs/calibration.md: ``python -m tools.calibrate [--markdown] [--breakdown]
[--sensitivity] [--cpu] [--constants]``.

The published runs and the predictions are library code (:mod:`planner.cost.calibrate`); this
command prints them as tables. ``--cpu`` measures this machine (:mod:`bench.cpu_calibration`).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from planner.cluster import ClusterSpec
from planner.cost.calibrate import (
    KORTHIKANTI_TABLE4_MS,
    MfuResult,
    RowResult,
    korthikanti_rows,
    layer_overheads,
    narayanan_rows,
)
from planner.cost.constants import CostConstants
from planner.cost.model import usable_memory_bytes

GiB = 2**30


def markdown_table(rows: list[RowResult]) -> str:
    head = ("| model | tp | pp | dp | batch | chosen micro-batch, schedule | published TFLOP/s/GPU | predicted "
            "TFLOP/s/GPU | published s/iter | predicted s/iter | error | peak memory GiB | fits 80 GB | "
            "least memory GiB (micro-batch 1) | fits 40 GB |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        cfg = r.config
        sched = cfg.schedule + (f" v={cfg.virtual_stages}" if cfg.virtual_stages > 1 else "")
        lines.append(
            f"| {r.run.name} ({r.run.params_b:g}B) | {cfg.tp} | {cfg.pp} | {cfg.dp} | {r.run.batch} | "
            f"{cfg.micro_batch_size}, {sched} | {r.run.tflops_per_gpu:.0f} | {r.predicted_tflops:.1f} | "
            f"{r.published_s:.2f} | {r.predicted_s:.2f} | {r.error:+.1%} | "
            f"{r.prediction.peak_memory_bytes / GiB:.1f} | {'yes' if r.prediction.fits else 'no'} | "
            f"{r.least_memory_bytes / GiB:.1f} | {'yes' if r.fits_40gb else 'no'} |")
    worst = max(rows, key=lambda r: abs(r.error))
    lines.append("")
    lines.append(f"Largest error: {worst.run.name} {worst.error:+.1%} (iteration time).")
    return "\n".join(lines)


def mfu_table(rows: list[MfuResult]) -> str:
    lines = ["| configuration | GPUs | tp | pp | dp | batch | micro-batch | published MFU | predicted MFU | "
             "predicted s/iter | error (iteration time) | peak memory GiB | fits 80 GB |", "|" + "---|" * 13]
    for r in rows:
        p, run = r.prediction, r.run
        lines.append(f"| {run.name} | {run.tp * run.pp * run.dp} | {run.tp} | {run.pp} | {run.dp} | {run.batch} | "
                     f"{run.micro_batch} | {run.mfu:.1%} | {p.mfu:.1%} | {p.step_time_s:.2f} | {r.error:+.1%} | "
                     f"{p.peak_memory_bytes / GiB:.1f} | {'yes' if p.fits else 'no'} |")
    full, sel = rows[1], rows[0]
    lines.append("")
    lines.append(f"Selective + sequence parallel over full recomputation: published "
                 f"{sel.run.mfu / full.run.mfu:.3f}x, predicted "
                 f"{full.prediction.step_time_s / sel.prediction.step_time_s:.3f}x.")
    return "\n".join(lines)


def overhead_table() -> str:
    pred = {mb: layer_overheads(mb) for mb in (1, 4)}
    base = KORTHIKANTI_TABLE4_MS[("none", False)]
    lines = ["One layer of the 22B model: hidden 6144, 64 heads, sequence 2048, tensor parallel 8.", "",
             "| option | published ms | published vs baseline | predicted vs baseline, "
             "micro-batch 1 | predicted, micro-batch 4 |", "|" + "---|" * 5]
    names = {("none", False): "no recomputation (baseline)", ("none", True): "sequence parallel",
             ("full", False): "full recomputation", ("selective", False): "selective recomputation",
             ("selective", True): "selective + sequence parallel"}
    for key, ms in KORTHIKANTI_TABLE4_MS.items():
        lines.append(f"| {names[key]} | {ms} | {ms / base - 1:+.1%} | {pred[1][key]:+.1%} | {pred[4][key]:+.1%} |")
    return "\n".join(lines)


def breakdown_table(rows: list[RowResult]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r.prediction.time_breakdown_s if k not in keys]
    lines = ["| model | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for r in rows:
        step = r.predicted_s
        cells = [f"{r.prediction.time_breakdown_s.get(k, 0.0) / step:.1%}" for k in keys]
        lines.append(f"| {r.run.name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SENSITIVITY = (
    ("defaults", {}),
    ("gemm_efficiency_max 0.70", {"gemm_efficiency_max": 0.70}),
    ("gemm_efficiency_max 0.90", {"gemm_efficiency_max": 0.90}),
    ("gemm_half_efficiency_dim 48", {"gemm_half_efficiency_dim": 48.0}),
    ("gemm_half_efficiency_dim 192", {"gemm_half_efficiency_dim": 192.0}),
    ("elementwise_traffic_factor 1.0 (unfused)", {"elementwise_traffic_factor": 1.0}),
    ("elementwise_traffic_factor 0.2", {"elementwise_traffic_factor": 0.2}),
    ("link/network efficiency 0.5", {"link_efficiency": 0.5, "network_efficiency": 0.5}),
)


def sensitivity_table() -> str:
    """Mean and worst error over Table 1 when one group of constants moves away from its default."""
    lines = ["| constants | mean error | worst error | rows within 15% |", "|---|---|---|---|"]
    for label, change in SENSITIVITY:
        rows = narayanan_rows(replace(CostConstants(), **change))
        errs = [r.error for r in rows]
        worst = max(errs, key=abs)
        within = sum(abs(e) <= 0.15 for e in errs)
        lines.append(f"| {label} | {sum(errs) / len(errs):+.1%} | {worst:+.1%} | {within}/{len(errs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print markdown tables (docs/calibration.md)")
    parser.add_argument("--breakdown", action="store_true", help="also print each row's step-time breakdown")
    parser.add_argument("--constants", action="store_true", help="print the default cost constants and exit")
    parser.add_argument("--sensitivity", action="store_true", help="also print Table 1 errors under other constants")
    parser.add_argument("--cpu", action="store_true", help="also measure and predict small models on this CPU")
    args = parser.parse_args(argv)
    if args.constants:
        print("| constant | default |\n|---|---|")
        c = CostConstants()
        for key, value in c.to_dict().items():
            print(f"| `{key}` | {value:g} |" if isinstance(value, float) else f"| `{key}` | {value} |")
        print()
        for dtype in ("bf16", "fp32"):
            w, g, o = c.state_bytes(dtype)
            print(f"state bytes per parameter training in {dtype}: weights {w:g}, gradients {g:g}, "
                  f"optimizer {o:g}, total {w + g + o:g}")
        small, big = (ClusterSpec.preset(n) for n in ("dgx-a100-40g", "dgx-a100-80g"))
        for cl in (small, big):
            print(f"usable memory on {cl.device.name}: {usable_memory_bytes(cl, c) / GiB:.1f} GiB of "
                  f"{cl.device.memory_bytes / GiB:.0f} GiB")
        return 0
    rows = narayanan_rows()
    print(markdown_table(rows) if args.markdown else "\n".join(
        f"{r.run.name:10s} published {r.run.tflops_per_gpu:5.0f} TFLOP/s  predicted {r.predicted_tflops:6.1f}  "
        f"error {r.error:+.1%}  ({r.config.label()})" for r in rows))
    mfu = korthikanti_rows()
    print()
    print(mfu_table(mfu) if args.markdown else "\n".join(
        f"{r.run.name}: published MFU {r.run.mfu:.1%}  predicted {r.prediction.mfu:.1%}  error {r.error:+.1%}"
        for r in mfu))
    print()
    print(overhead_table())
    if args.breakdown:
        print()
        print(breakdown_table(rows))
    if args.sensitivity:
        print()
        print(sensitivity_table())
    if args.cpu:
        from bench.cpu_calibration import cpu_report

        print()
        print(cpu_report(markdown=args.markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
