"""How far a predicted step time may be off: the validation residuals of the plan's regime.

``python -m planner validate`` prices real measured runs (``datasets/measured/``) with this cost
model. Grouped by *regime* (how many nodes a plan spans, whether it pipelines, and whether a pipeline
over nodes runs under tensor parallelism: what decides which parts of the cost model a prediction
leans on), the ratio measured ÷ predicted
step time has a spread; a plan's band is its prediction times that ratio's 10th and 90th percentile
in its regime. ``python -m planner validate --write-bands`` recomputes the table
(``datasets/measured/error_bands.json``), and a test keeps it equal to what the current cost model
gives, so a change to the cost model that moves the residuals moves the bands with it.

Where no measured run falls in the regime (a CPU cluster, a single device) the plan says so rather
than inventing a band.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from planner.paths import datasets_dir

BANDS_FILE = "error_bands.json"
LOW_Q, HIGH_Q = 0.10, 0.90
# Breakdown parts the validation shows the cost model is least sure of, in words for `explain`.
_EFFECTS = {
    "tp_comm": "tensor-parallel collectives",
    "ep_all_to_all": "expert-parallel all-to-alls",
    "pp_bubble": "the pipeline bubble",
    "pp_step_overhead": "per-step pipeline overheads",
    "pp_tp_wait": "tensor-parallel collectives waiting in a multi-node pipeline",
    "pp_p2p_exposed": "pipeline sends",
    "dp_comm_exposed": "data-parallel gradient reduction",
    "dp_comm_exposed_after_overlap": "data-parallel gradient reduction left after overlap",
    "zero3_gather_exposed": "ZeRO-3 parameter gathers",
    "embedding_sync": "the tied-embedding gradient sync",
    "recompute": "recomputation",
}
# Clusters whose "devices" are host processes: the validation has no measured run of that kind.
_HOST_LINKS = ("loopback", "shm")


def regime(nodes: int, pp: int, tp: int = 1) -> str:
    """The regime a plan of ``pp`` pipeline stages and ``tp``-way tensor parallelism on ``nodes`` nodes
    belongs to. A pipeline over nodes under tensor parallelism is its own regime: the measured sweep
    runs it up to several times slower than priced, with micro-batches small next to tp, while on 2-16
    nodes pipelines without tp price about as well as no pipeline (docs/validation.md)."""
    span = "1 node" if nodes <= 1 else ("2-16 nodes" if nodes <= 16 else "over 16 nodes")
    if pp <= 1:
        return f"{span}, no pipeline"
    return f"{span}, pipelined with tensor parallelism" if nodes > 1 and tp > 1 else f"{span}, pipelined"


@dataclass(frozen=True, kw_only=True)
class ErrorBand:
    """Measured ÷ predicted step time of the validation runs in one regime."""

    regime: str
    runs: int
    low: float  # 10th percentile of measured / predicted
    median: float
    high: float  # 90th percentile

    def to_dict(self) -> dict[str, Any]:
        return {"regime": self.regime, "runs": self.runs, "ratio_p10": self.low, "ratio_p50": self.median,
                "ratio_p90": self.high}


def quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile of an ascending list (numpy's default method)."""
    if not sorted_values:
        raise ValueError("quantile of no values")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def bands_from_ratios(ratios: dict[str, list[float]]) -> dict[str, ErrorBand]:
    """One band per regime from its measured ÷ predicted ratios (regimes with fewer than 5 runs are left out)."""
    out = {}
    for name, values in sorted(ratios.items()):
        xs = sorted(values)
        if len(xs) < 5:
            continue
        out[name] = ErrorBand(regime=name, runs=len(xs), low=round(quantile(xs, LOW_Q), 4),
                              median=round(quantile(xs, 0.5), 4), high=round(quantile(xs, HIGH_Q), 4))
    return out


def bands_path() -> Path:
    return datasets_dir() / "measured" / BANDS_FILE


def write_bands(bands: dict[str, ErrorBand], command: str, path: Path | None = None) -> Path:
    path = path or bands_path()
    body = {"generated_by": command, "quantiles": [LOW_Q, 0.5, HIGH_Q],
            "ratio": "measured / predicted step time",
            "bands": {k: b.to_dict() for k, b in bands.items()}}
    path.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    return path


def load_bands(path: Path | None = None) -> dict[str, ErrorBand]:
    """The bands file (read once per path and modification time: every plan built asks for it)."""
    path = path or bands_path()
    if not path.exists():
        return {}
    return dict(_read_bands(path, path.stat().st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _read_bands(path: Path, mtime_ns: int) -> tuple[tuple[str, ErrorBand], ...]:
    body = json.loads(path.read_text())
    return tuple((k, ErrorBand(regime=v["regime"], runs=v["runs"], low=v["ratio_p10"], median=v["ratio_p50"],
                               high=v["ratio_p90"])) for k, v in body.get("bands", {}).items())


def dominant_effects(breakdown_s: dict[str, float], step_s: float, limit: int = 3) -> list[str]:
    """The parts of the step the prediction is least sure of, largest first (each at least 5% of it)."""
    if step_s <= 0:
        return []
    parts = sorted(((v, k) for k, v in breakdown_s.items() if k in _EFFECTS and v >= 0.05 * step_s), reverse=True)
    out = [f"{_EFFECTS[k]} ({v / step_s:.0%} of the step)" for v, k in parts[:limit]]
    compute = breakdown_s.get("compute", 0.0)
    if compute >= 0.5 * step_s:
        out.append(f"the achieved GEMM and attention rates ({compute / step_s:.0%} of the step is compute)")
    return out


def describe(step_s: float, breakdown_s: dict[str, float], *, nodes: int, pp: int, intra_link: str,
             bands: dict[str, ErrorBand] | None = None, tp: int = 1) -> dict[str, Any]:
    """The plan's ``predicted.uncertainty``: its regime, the band in seconds and the dominant effects."""
    effects = dominant_effects(breakdown_s, step_s)
    name = regime(nodes, pp, tp)
    band = None if intra_link in _HOST_LINKS else (load_bands() if bands is None else bands).get(name)
    if band is None:
        why = ("no measured run of host-process clusters in the validation data (see `make bench`)"
               if intra_link in _HOST_LINKS else "no measured run in this regime")
        return {"regime": name, "runs": 0, "note": why, "dominant_effects": effects}
    return {**band.to_dict(), "step_time_low_s": step_s * band.low, "step_time_high_s": step_s * band.high,
            "dominant_effects": effects}


def summary_line(uncertainty: dict[str, Any]) -> str:
    """One sentence for `plan` and `explain`."""
    if not uncertainty:
        return ""
    if not uncertainty.get("runs"):
        return f"error band: none ({uncertainty.get('note', 'no measured runs')})"
    line = (f"error band: {uncertainty['step_time_low_s']:.4g}-{uncertainty['step_time_high_s']:.4g} s "
            f"(measured/predicted {uncertainty['ratio_p10']:.2f}-{uncertainty['ratio_p90']:.2f}, median "
            f"{uncertainty['ratio_p50']:.2f}, over {uncertainty['runs']} validation runs: {uncertainty['regime']})")
    effects = uncertainty.get("dominant_effects") or []
    if effects:
        line += "; least certain: " + ", ".join(effects)
    return line
