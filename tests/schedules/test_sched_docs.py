"""docs/schedules.md is what `python -m tools.schedules_docs` prints; figures are drawn."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.schedules import SCHEDULE_NAMES, estimate, plot_timeline, simulate
from tools import schedules_docs as schedule_docs

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_schedules_page_is_up_to_date():
    page = (DOCS / "schedules.md").read_text()
    assert page == schedule_docs.render(schedule_docs.results()), (
        "docs/schedules.md is stale: run python -m tools.schedules_docs"
    )
    for name in SCHEDULE_NAMES:
        assert f"### `{name}`" in page
        assert f"(schedules/{name}.png)" in page
        assert (DOCS / "schedules" / f"{name}.png").is_file()


def test_table_row_for_1f1b():
    row = next(line for line in schedule_docs.table(schedule_docs.results()).splitlines() if "`1f1b`" in line)
    # p=4, m=8, F=B=W=1: step (m+p-1)*3 = 33, bubble 3/11, device 0 holds p = 4.
    assert row == "| `1f1b` | yes | 1 | 33 | 27.3% | 27.3% | 4 (4) | 1 | 0 | Schedule1F1B |"


@pytest.mark.parametrize("name", ["zb-v", "pipedream"])
def test_plot_timeline_writes_a_png(tmp_path, name):
    v = 2 if name == "zb-v" else 1
    r = simulate(name, p=3, m=6, v=v, fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=1.0)
    out = tmp_path / f"{name}.png"
    plot_timeline(r, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert out.stat().st_size > 10_000


def test_plot_timeline_needs_a_timeline():
    with pytest.raises(ValueError, match="no timeline"):
        plot_timeline(estimate("1f1b", p=2, m=2, fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=1.0), "x.png")
