"""Smoke tests of the `make bench` harness (bench/): a quick run of the in-process sections, its page,
its figure and its numbers; the helpers the sections rely on. The sections that start processes
(measured runs, planner-cost sweep) run in the test marked slow."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from bench.__main__ import main
from bench.common import loglog_slope, md_table, shown
from bench.point import measure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _column(page: str, header: str) -> list[str]:
    """Cells of the column named ``header`` in every Markdown table of ``page`` that has it."""
    cells, index = [], None
    for line in page.splitlines():
        if not line.startswith("|"):
            index = None
            continue
        row = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # "\|" is a literal bar
        if index is None:
            index = row.index(header) if header in row else -1
            continue
        if index >= 0 and not set(line) <= set("|-"):
            cells.append(row[index])
    return cells


def test_loglog_slope_recovers_the_exponent():
    xs = [8, 16, 64, 512, 4096]
    slope, intercept = loglog_slope(xs, [3.0 * x**1.5 for x in xs])
    assert slope == pytest.approx(1.5, abs=1e-9)
    assert math.exp(intercept) == pytest.approx(3.0, rel=1e-9)
    assert math.isnan(loglog_slope([4], [1.0])[0])


def test_md_table_and_shown_command():
    import sys

    assert md_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    assert shown([sys.executable, "-m", "bench", "--quick"]) == "python -m bench --quick"


def test_point_measures_one_plan():
    point = measure("gpt-tiny", "cpu-local", global_batch=4)
    assert point["feasible"] is True
    assert point["gpus"] == 2
    assert 0 < point["search_s"] <= point["wall_s"]
    assert point["peak_delta_mib"] >= 0 and point["peak_rss_mib"] > point["peak_delta_mib"]


def test_quick_run_writes_page_figure_and_ratios(tmp_path: Path):
    out = tmp_path / "benchmarks.md"
    assert main(["--quick", "--only", "predicted", "inter_op", "planning_speed", "-o", str(out),
                 "--work-dir", str(tmp_path / "work")]) == 0
    page = out.read_text()
    assert page.startswith("# Benchmarks")
    assert "Produced by `python -m bench --quick --only predicted inter_op planning_speed" in page
    for title in ("## Predicted step time", "## Layer-to-device solver", "## Planning speed", "## Bench time"):
        assert title in page
    assert "failed" not in page.lower()
    # Every workload has a plan no slower than its best baseline (same cost model, the search covers them).
    ratios = _column(page, "plan / best baseline")
    assert len(ratios) >= 3  # two predicted workloads + one planning-speed case
    for cell in ratios:
        value = float(re.search(r"\d+\.\d+", cell).group())
        assert value <= 1.0, cell
    # The exact stage DP is never slower than a baseline split on the same configuration.
    for cell in _column(page, "DP / best baseline split") + _column(page, "solver / best baseline"):
        assert float(cell) <= 1.0, cell
    png = tmp_path / "benchmarks" / "predicted_speedup.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert "](benchmarks/predicted_speedup.png)" in page
    assert "python -m bench --only predicted" in page  # the command next to the figure


@pytest.mark.slow
@pytest.mark.multiprocess
def test_quick_measured_runs_and_planner_cost(tmp_path: Path):
    out = tmp_path / "benchmarks.md"
    work = tmp_path / "work"
    assert main(["--quick", "--only", "measured", "planner_cost", "-o", str(out), "--work-dir", str(work)]) == 0
    page = out.read_text()
    # the plan ran, and DDP either ran or is the plan's own configuration (then it shows the plan's runs)
    medians = [m.group(0) for c in _column(page, "measured step (s)") if (m := re.match(r"[\d.e-]+", c))]
    assert len(medians) == 2 and all(float(m) > 0 for m in medians)
    ratios = _column(page, "plan / best hand-picked (measured)")
    assert len(ratios) == 1 and float(ratios[0]) > 0
    assert (work / "cpu" / "cpu-local-n2.json").exists()  # the profiled cluster the plans were priced on
    metrics = json.loads(next(work.glob("cpu/*/plan.r1.metrics.json")).read_text())
    assert metrics["measured"]["step_time_s"] > 0
    slopes = _column(page, "wall time")
    assert len(slopes) == 2 and all(math.isfinite(float(s)) for s in slopes)
    assert (tmp_path / "benchmarks" / "planner_cost.png").read_bytes()[:8] == PNG_MAGIC
