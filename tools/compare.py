"""What the published-configuration tools share: the knobs two configurations differ in, and a
markdown table in the layout docs/search.md uses."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from planner.plan import ParallelConfig


def differences(published: ParallelConfig, planned: ParallelConfig, knobs: Iterable[str]) -> list[str]:
    """``"knob old→new"`` for each of ``knobs`` whose value differs, in the order given."""
    return [f"{k} {getattr(published, k)}→{getattr(planned, k)}" for k in knobs
            if getattr(published, k) != getattr(planned, k)]


def markdown(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table: the header, a ``| --- |`` rule, one line per row."""
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
