"""Invariants every simulated timeline must satisfy, on random schedules, sizes and stage times."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.schedules import SCHEDULE_NAMES, Action, get_schedule, simulate

EPS = 1e-9


@st.composite
def cases(draw):
    name = draw(st.sampled_from(SCHEDULE_NAMES))
    info = get_schedule(name)
    p = draw(st.integers(2, 6).filter(lambda x: x % 2 == 0) if name == "chimera" else st.integers(1, 6))
    v = info.chunks_per_device or draw(st.integers(info.min_v, 3))
    lo = info.min_microbatches(p)
    if name in ("interleaved-1f1b", "chimera"):
        m = p * draw(st.integers(max(1, lo // p), max(1, 12 // p)))
    else:
        m = draw(st.integers(lo, max(lo, 12)))
    n = p * v
    times = st.lists(st.floats(0.05, 3.0), min_size=n, max_size=n)
    return dict(
        name=name,
        p=p,
        m=m,
        v=v,
        fwd_s=draw(times),
        bwd_input_s=draw(times),
        bwd_weight_s=draw(st.lists(st.floats(0.0, 2.0), min_size=n, max_size=n)),
        p2p_s=draw(st.sampled_from([0.0, 0.01, 0.3, 2.0])),
    )


@settings(max_examples=120, deadline=None)
@given(cases())
def test_timeline_respects_every_dependency(case):
    r = simulate(**case)
    program, c = r.program, case["p2p_s"]
    last = program.num_stages - 1
    span: dict[Action, tuple[float, float, int]] = {}
    for device, rows in enumerate(r.timeline):
        previous_end = 0.0
        for start, end, text in rows:
            assert start >= previous_end - EPS, f"d{device} runs two things at once at {start}"
            assert end >= start
            previous_end = end
            action = Action.parse(text)
            assert action not in span, f"{action} runs twice"
            span[action] = (start, end, device)

    # Every (stage, micro-batch) has one F and one backward: a full B, or an I followed by its W.
    kinds = Counter((a.stage, a.microbatch, a.kind) for a in span)
    for k in range(program.num_stages):
        for j in range(program.microbatches):
            assert kinds[(k, j, "F")] == 1
            assert kinds[(k, j, "B")] + kinds[(k, j, "I")] == 1
            assert kinds[(k, j, "W")] == kinds[(k, j, "I")]

    def hop(k1: int, k2: int, j: int) -> float:
        return c if program.device_of(k1, j) != program.device_of(k2, j) else 0.0

    for a, (start, _, device) in span.items():
        k, j = a.stage, a.microbatch
        assert device == program.device_of(k, j)
        if a.kind == "F" and k > 0:
            assert start >= span[Action(k - 1, "F", j)][1] + hop(k - 1, k, j) - EPS
        if a.kind in ("I", "B"):
            assert start >= span[Action(k, "F", j)][1] - EPS  # its own forward first
            if k < last:
                nxt = span.get(Action(k + 1, "I", j)) or span[Action(k + 1, "B", j)]
                assert start >= nxt[1] + hop(k + 1, k, j) - EPS
        if a.kind == "W":
            assert start >= span[Action(k, "I", j)][1] - EPS


@settings(max_examples=40, deadline=None)
@given(cases())
def test_busy_time_and_bubble_agree(case):
    r = simulate(**case)
    if not r.synchronous:
        return
    per_mb = sum(case["fwd_s"]) + sum(case["bwd_input_s"]) + sum(case["bwd_weight_s"])
    busy = sum(e - s for rows in r.timeline for s, e, _ in rows)
    assert busy == pytest.approx(case["m"] * per_mb, rel=1e-9)
    assert r.bubble_fraction == pytest.approx(1 - busy / (case["p"] * r.step_time_s), abs=1e-9)
    assert r.overlapped_step_time_s <= r.step_time_s + EPS
