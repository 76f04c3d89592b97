"""The validation metrics, as plain functions of predicted and measured numbers.

Per (model, GPU count) group of measured configurations (Issue 21's definitions):

* **top-1** = measured throughput of the configuration the planner ranks first ÷ the group's best
  measured throughput. The planner ranks the group's configurations that ran (status ok) and that
  it predicts to fit, fastest predicted first; when it predicts none to fit, it would pick none:
  top-1 is 0.
* **Spearman** ρ between predicted and measured throughput over the *healthy* configurations
  (ran, and measured ≥ 25% of the group's best), ties given their average rank; ``nan`` below 3.
* **error** = median over the healthy configurations of |predicted step time ÷ measured − 1|.
* **fit**: of the runs that ran, the share predicted to fit; of the runs that failed (crashed or
  out of memory), the share predicted not to fit.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

HEALTHY_FRACTION = 0.25


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's on the (tie-averaged) ranks. ``nan`` with fewer than 3
    pairs or when either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    if len(x) < 3:
        return math.nan
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return math.nan
    return sxy / math.sqrt(sxx * syy)


def top1(predicted: Sequence[float], measured: Sequence[float], fits: Sequence[bool]) -> tuple[float, int | None]:
    """(measured of the fastest-predicted fitting configuration ÷ best measured, its index).

    ``(0.0, None)`` when none is predicted to fit; ties in prediction go to the first listed.
    """
    best = max(measured)
    chosen = None
    for i, (p, ok) in enumerate(zip(predicted, fits)):
        if ok and (chosen is None or p > predicted[chosen]):
            chosen = i
    if chosen is None or best <= 0:
        return 0.0, None
    return measured[chosen] / best, chosen


def healthy(measured: Sequence[float], fraction: float = HEALTHY_FRACTION) -> list[bool]:
    best = max(measured) if measured else 0.0
    return [m >= fraction * best for m in measured]


def median_abs_error(ratios: Sequence[float]) -> float:
    """Median of |ratio − 1| (``nan`` when empty)."""
    return statistics.median(abs(r - 1) for r in ratios) if ratios else math.nan


def share(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else math.nan


def nan_median(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan
