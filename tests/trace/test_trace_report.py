"""``python -m tools.trace_report`` prints the table docs/tracing.md shows, for every listed model."""

from __future__ import annotations

from pathlib import Path

from tools import trace_report as report

DOC = Path(__file__).resolve().parents[2] / "docs" / "tracing.md"


def test_report_prints_a_markdown_row_per_model(capsys):
    assert report.main(["resnet50"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "| " + " | ".join(report.HEADER) + " |"
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:6] == ["resnet50", "fx", "25.6M", "176", "18", "10 (5 x layer3.* (Bottleneck))"]
    assert cells[6] == "8.2"  # GFLOP per 224x224 image


def test_doc_table_covers_every_listed_model_next_to_its_command():
    text = DOC.read_text()
    assert "python -m tools.trace_report --hf" in text
    header = "| " + " | ".join(report.HEADER) + " |"
    assert header in text
    table = text[text.index(header):]
    for name in report.PRESETS + report.HF:
        assert f"| {name} |" in table, name
