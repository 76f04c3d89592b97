"""Fit one cluster figure (or two jointly) to measured runs, on a subset, and check it on runs it did not see.

Two figures the datasheets do not give and the shared measurements pin down:

* ``device.gemm_efficiency``: the share of its datasheet peak a device's large GEMMs keep through a
  training step (clocks under the power limit, tiles and waves sized for more SMs). The cost model's
  0.8 was set on A100s. Fitted on the sweep's one-node groups (no network in the step), checked on
  every published run of that device.
* ``intra_node.latency_s`` of the sweep's cluster (``datasets/measured/nanotron-h100-efa.json``): the
  per-hop time of a tensor-parallel collective as the sweep's trainer pays it (NCCL's launch, the
  ring's handshakes, the trainer waiting on each collective), which the playbook did not measure.
  It sets what a micro-batch costs beyond its FLOPs under tensor parallelism. Fitted on the one-node
  groups, checked on the multi-node groups.

* ``device.fused_attention_efficiency``: the share of peak the FlashAttention-2-class kernels the
  presets describe sustain in training. Fitted on sweep groups or on one publisher's runs of a device
  (``--fit-published PREFIX[,PREFIX...]``: the published runs whose id starts with one, on ``--presets``), checked
  on the other publishers' runs of that device. Runs whose source names another kernel keep it.
* ``attention_kernel.NAME``: the same figure for a kernel a source names
  (``planner.validation.cases.ATTENTION_KERNELS``: llm-foundry's Triton FlashAttention,
  ``triton-2022``), on ``--device``; it moves only the runs that ran that kernel.

    python -m tools.fit_cluster --param device.gemm_efficiency
    python -m tools.fit_cluster --param device.gemm_efficiency --param device.fused_attention_efficiency \
        --fit-groups playbook-1B:8,playbook-3B:8,playbook-1B:16,playbook-3B:16 \
        --grid 0.56:0.66:0.02 --grid 0.20:0.30:0.02     # the H100 presets' two figures, jointly
    python -m tools.fit_cluster --param intra_node.latency_s
    python -m tools.fit_cluster --param device.fused_attention_efficiency --device A100-SXM4-80GB \
        --fit-published llmfoundry --presets dgx-a100-80g,dgx-a100-40g
    python -m tools.fit_cluster --param attention_kernel.triton-2022 --device H100-SXM5-80GB \
        --fit-published llmfoundry-h100 --presets dgx-h100

Objective: the median |log(predicted / measured step time)| over the healthy configurations (>= 25%
of the group's best) of the fit groups.
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics

from planner.validation.cases import ATTENTION_KERNELS, Case, load_cases
from planner.validation.metrics import healthy, spearman
from planner.validation.price import Priced, validate_cases

PARAMS = {
    "device.gemm_efficiency": "0.40:0.81:0.02",
    "device.fused_attention_efficiency": "0.20:0.55:0.05",
    "intra_node.latency_s": "0:8.1e-05:5e-06",
    **{f"attention_kernel.{name}": "0.10:0.36:0.02" for name in ATTENTION_KERNELS},
    "constants.pipelined_tp_collective_s": "2e-4:1.6e-3:2e-4",
    "constants.pipelined_tp_hop_s": "1e-4:6e-4:1e-4",
}


def _groups(priced: list[Priced]) -> dict[str, list[tuple[Priced, bool]]]:
    by_group: dict[str, list[Priced]] = {}
    for p in priced:
        if p.case.status == "ok" and p.step_ratio:
            by_group.setdefault(p.case.group, []).append(p)
    return {g: list(zip(rows, healthy([r.case.measured_tokens_per_s_per_gpu for r in rows])))
            for g, rows in by_group.items()}


def _log_error(priced: list[Priced]) -> float:
    errs = [abs(math.log(r.step_ratio)) for rows in _groups(priced).values() for r, h in rows if h]
    return statistics.median(errs)


def _spearman(priced: list[Priced]) -> float:
    rhos = []
    for rows in _groups(priced).values():
        ok = [r for r, h in rows if h]
        rho = spearman([1 / r.predicted_step_s for r in ok], [r.case.measured_tokens_per_s_per_gpu for r in ok])
        if rho == rho:
            rhos.append(rho)
    return statistics.median(rhos)


_GRAPHS: dict = {}  # every grid point prices the same models: trace each once (planner.validation.price)


def _price(cases, values: dict[str, float | None], device: str):
    """Price ``cases`` with each fitted parameter at its value (``None``: as the files have it)."""
    device_fields: dict[str, float | None] = {}
    kernels: dict[str, dict[str, float]] = {}
    sweep: dict[str, float] = {}
    constants: dict[str, float] = {}
    for param, value in values.items():
        kind, name = param.split(".", 1)
        if kind == "device":
            device_fields[name] = value
        elif value is not None and kind == "attention_kernel":
            kernels[name] = {device: value}
        elif value is not None and kind == "constants":
            constants[name] = value
        elif value is not None:
            sweep[param] = value
    return validate_cases(cases, device_overrides={device: device_fields} if device_fields else None,
                          kernel_overrides=kernels, sweep_overrides=sweep, graphs=_GRAPHS, overrides=constants).priced


def _grid(spec: str) -> list[float]:
    start, stop, step = (float(x) for x in spec.split(":"))
    return [round(start + i * step, 9) for i in range(int(round((stop - start) / step)) + 1)]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m tools.fit_cluster", description=__doc__.split("\n")[0])
    ap.add_argument("--param", choices=sorted(PARAMS), action="append",
                    help="the figure to fit (default device.gemm_efficiency); give it twice to fit two jointly "
                    "on the grid of every pair")
    ap.add_argument("--device", default="H100-SXM5-80GB", help="the device name (device.* parameters)")
    ap.add_argument("--fit-groups", default="playbook-1B:8,playbook-3B:8",
                    help="sweep groups to fit on (comma-separated; one node each)")
    ap.add_argument("--grid", action="append", help="start:stop:step of the values tried, one per --param "
                    "(default per parameter)")
    ap.add_argument("--fit-published", metavar="PREFIX", help="fit on the published runs whose id starts with "
                    "PREFIX (comma-separated: any of them; on --presets) instead of sweep groups; check on the other "
                    "published runs there")
    ap.add_argument("--presets", default="dgx-h100", help="cluster presets of the published runs fitted and "
                    "checked (comma-separated)")
    return ap


def _check(check: list[Case], params: list[str], best: tuple[float, ...], device: str, per_device: bool,
           kernels: set[str], presets: set[str]) -> None:
    """Print how the runs outside the fit set are priced, with the files' figures and with the fitted ones."""
    unfitted = {"device": "without the field (the constant)", "attention_kernel": "as ATTENTION_KERNELS has it"}
    kinds = {p.split(".")[0] for p in params}
    label0 = unfitted.get(kinds.pop(), "as the files have it") if len(kinds) == 1 else "as the files have it"
    fitted = ", ".join(f"{v:g}" for v in best)
    for label, values in ((label0, dict.fromkeys(params)), (f"fitted {fitted}", dict(zip(params, best)))):
        if not check:
            print(f"check: no run outside the fit set ran {' or '.join(sorted(kernels))} on {sorted(presets)}")
            break
        priced = _price(check, values, device)
        if per_device:
            ratios = [p.step_ratio for p in priced if p.step_ratio]
            within = sum(abs(r - 1) <= 0.15 for r in ratios)
            print(f"check, published {device} runs (not fitted), {label}: median pred/meas "
                  f"{statistics.median(ratios):.2f}, within 15%: {within}/{len(ratios)}")
        else:
            print(f"check, the other sweep groups (not fitted), {label}: median abs(log(pred/meas)) "
                  f"{_log_error(priced):.3f}, median Spearman {_spearman(priced):.3f}")


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    params = args.param or ["device.gemm_efficiency"]
    if len(set(params)) != len(params) or len(params) > 2:
        ap.error("--param: give one figure, or two different ones")
    if args.grid and len(args.grid) != len(params):
        ap.error(f"--grid: give one per --param ({len(params)}), or none for the defaults")
    grids = [_grid(g) for g in (args.grid or [PARAMS[p] for p in params])]
    per_device = all(p.startswith(("device.", "attention_kernel.")) for p in params)  # checked on published runs
    cases = load_cases("all").cases
    presets = set(args.presets.split(","))
    on_device = [c for c in cases if c.source == "published" and c.cluster.preset in presets]
    if args.fit_published:
        prefixes = tuple(x for x in args.fit_published.split(",") if x.strip())
        if not prefixes:
            ap.error("--fit-published: got no prefix; give run-id prefixes, comma-separated (e.g. llmfoundry-h100)")
        fit_groups = {f"published {'|'.join(prefixes)}* on {sorted(presets)}"}
        fit = [c for c in on_device if c.case_id.startswith(prefixes)]
        check = [c for c in on_device if not c.case_id.startswith(prefixes)]
    else:
        fit_groups = set(args.fit_groups.split(","))
        fit = [c for c in cases if c.group in fit_groups]
        check = on_device if per_device else \
            [c for c in cases if c.source == "sweep" and c.group not in fit_groups]
    if not fit:
        raise SystemExit(f"no case to fit on in {sorted(fit_groups)}")
    kernels = {p.split(".", 1)[1] for p in params if p.startswith("attention_kernel.")}
    if kernels:  # a kernel's figure moves only the runs that ran it: check on those alone
        check = [c for c in check if c.cluster.attention_kernel in kernels]
    rows = [(_log_error(_price(fit, dict(zip(params, combo)), args.device)), combo)
            for combo in itertools.product(*grids)]
    best = min(rows)[1]
    print(f"{' and '.join(params)}: fitted on the healthy configurations of {sorted(fit_groups)}")
    print("| " + " | ".join(params) + " | median abs(log(pred/meas)) on the fit set |")
    print("|" + "---|" * (len(params) + 1))
    for err, combo in rows:
        print("| " + " | ".join(f"{v:g}" for v in combo) + f"{' (best)' if combo == best else ''} | {err:.3f} |")
    _check(check, params, best, args.device, per_device, kernels, presets)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
