"""estimate() and the memory/staleness closed forms agree with simulate(); bounds are bounds; it is fast."""

from __future__ import annotations

import random

import pytest

from planner.schedules import (
    SCHEDULE_NAMES,
    estimate,
    get_schedule,
    in_flight,
    simulate,
    staleness,
    weight_versions,
)
from planner.schedules import closed_form as cf

# (F, B, W, p2p) per chunk: equal parts, a heavy backward, a light W, and p2p latency in and out of the
# regimes where the closed forms hold (outside them estimate() times a compiled program).
TIMES = [(1.0, 1.0, 1.0, 0.0), (1.0, 1.5, 0.5, 0.2), (0.7, 1.3, 0.9, 0.0), (1.0, 2.0, 0.8, 1.5)]


def _grid():
    for name in SCHEDULE_NAMES:
        info = get_schedule(name)
        vs = [info.chunks_per_device] if info.chunks_per_device else ([1, 2] if info.min_v == 1 else [2, 3])
        for p in (1, 2, 3, 4, 6):
            for m in (1, 2, 3, 4, 6, 8, 12):
                for v in vs:
                    try:
                        info.validate(p, m, v)
                    except ValueError:
                        continue
                    yield name, p, m, v


GRID = list(_grid())


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_estimate_equals_simulate_for_uniform_stage_times(name):
    cases = [g for g in GRID if g[0] == name]
    assert len(cases) >= 8, f"grid too thin for {name}"
    for _, p, m, v in cases:
        for f, b, w, c in TIMES:
            sim = simulate(name, p=p, m=m, v=v, fwd_s=f, bwd_input_s=b, bwd_weight_s=w, p2p_s=c)
            est = estimate(name, p=p, m=m, v=v, fwd_s=f, bwd_input_s=b, bwd_weight_s=w, p2p_s=c)
            where = f"{name} p={p} m={m} v={v} times={(f, b, w, c)}"
            assert est.exact, where
            assert est.step_time_s == pytest.approx(sim.step_time_s, rel=1e-12), where
            assert est.bubble_fraction == pytest.approx(sim.bubble_fraction, abs=1e-12), where
            assert est.peak_in_flight == pytest.approx(sim.peak_in_flight, abs=1e-12), where
            assert est.weight_versions == sim.weight_versions, where
            assert est.staleness == sim.staleness, where
            assert est.timeline == () and sim.timeline, where


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_public_closed_forms_match_the_simulation(name):
    for _, p, m, v in [g for g in GRID if g[0] == name][::3]:
        sim = simulate(name, p=p, m=m, v=v, fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=1.0)
        for d in range(p):
            assert in_flight(name, p=p, m=m, v=v, device=d) == pytest.approx(sim.peak_in_flight[d], abs=1e-12)
            assert weight_versions(name, p=p, m=m, v=v, device=d) == sim.weight_versions[d]
            assert staleness(name, p=p, m=m, v=v, device=d) == sim.staleness[d]


@pytest.mark.parametrize("name", ["zb-h2", "zb-v", "dualpipe-v", "chimera", "zb-h1", "interleaved-1f1b"])
def test_closed_forms_hold_on_larger_pipelines(name):
    """The fitted forms at sizes the main grid does not reach (p up to 10, m up to 5p)."""
    rng = random.Random(7)
    info = get_schedule(name)
    v = info.chunks_per_device or 2
    checked = 0
    for p in (2, 5, 8, 10):
        for m in (p, 2 * p, 2 * p + 1, 5 * p):
            try:
                info.validate(p, m, v)
            except ValueError:
                continue
            f, b, w = rng.uniform(0.3, 2), rng.uniform(0.3, 2), rng.uniform(0.1, 1.5)
            c = 0.0 if name == "chimera" else rng.uniform(0, min(f, b, w) / 2)
            form = cf._sync_uniform(name, p, m, v, f, b, w, c)
            if form is None:
                continue
            sim = simulate(name, p=p, m=m, v=v, fwd_s=f, bwd_input_s=b, bwd_weight_s=w, p2p_s=c)
            assert form == pytest.approx(sim.step_time_s, rel=1e-12), (name, p, m, (f, b, w, c))
            checked += 1
    assert checked >= 6


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_non_uniform_times_exact_when_flagged_and_close_otherwise(name):
    rng = random.Random(sum(map(ord, name)))
    info = get_schedule(name)
    v = info.chunks_per_device or info.min_v
    for p, m in [(4, 8), (4, 12), (8, 16), (8, 48)]:
        if name == "chimera" and m % p:
            continue
        m = max(m, info.min_microbatches(p))
        n = p * v
        times = dict(
            fwd_s=[rng.uniform(0.5, 1.5) for _ in range(n)],
            bwd_input_s=[rng.uniform(0.8, 2.0) for _ in range(n)],
            bwd_weight_s=[rng.uniform(0.2, 1.0) for _ in range(n)],
            p2p_s=rng.choice([0.0, 0.05]),
        )
        sim = simulate(name, p=p, m=m, v=v, **times)
        est = estimate(name, p=p, m=m, v=v, **times)
        if est.exact:
            assert est.step_time_s == pytest.approx(sim.step_time_s, rel=1e-12), (name, p, m)
        else:  # the busiest device's work plus the bubble at the mean chunk (device_balanced_time)
            assert abs(est.step_time_s / sim.step_time_s - 1) <= 0.16, (name, p, m)


def test_large_programs_get_the_busiest_device_plus_the_mean_bubble():
    p, m = 8, 96  # 1F1B: 2 * 8 * 96 actions > EXACT_MAX_ACTIONS
    assert 2 * p * m > cf.EXACT_MAX_ACTIONS
    fwd = [1.0] * p
    fwd[3] = 1.2
    est = estimate("1f1b", p=p, m=m, fwd_s=fwd, bwd_input_s=2.0, bwd_weight_s=0.0)
    assert not est.exact
    mean = sum(fwd) / p + 2.0
    assert est.step_time_s == pytest.approx(m * 3.2 + (p - 1) * mean)
    sim = simulate("1f1b", p=p, m=m, fwd_s=fwd, bwd_input_s=2.0, bwd_weight_s=0.0)
    assert est.step_time_s == pytest.approx(sim.step_time_s, rel=0.02)


def test_interleaved_with_a_heavy_last_chunk_keeps_megatrons_bubble():
    # The case that charged the slowest chunk everywhere: 16 devices x 2 chunks, m = 64, the last chunk
    # (the LM head) 3x the others. The bubble must stay near (p - 1) average chunks, not (p - 1) heavy ones.
    p, v, m = 16, 2, 64
    fwd = [1.0] * (p * v)
    fwd[-1] = 3.0
    bwd = [2 * f for f in fwd]
    est = estimate("interleaved-1f1b", p=p, m=m, v=v, fwd_s=fwd, bwd_input_s=bwd, bwd_weight_s=0.0)
    assert not est.exact
    busiest = m * (3.0 + 9.0)  # the device holding chunks p-1 and 2p-1: (1 + 3) x (1 + 2)
    mean = 3 * sum(fwd) / len(fwd)
    assert est.step_time_s == pytest.approx(busiest + (p - 1) * mean)


def test_estimate_never_builds_a_timeline():
    # The search calls estimate() ~100k times, so it must stay closed-form (its speed is in
    # `make bench`, not asserted here): no per-action timeline is ever materialised.
    rng = random.Random(0)
    for name in SCHEDULE_NAMES:
        info = get_schedule(name)
        v = info.chunks_per_device or info.min_v
        for _ in range(20):
            f = rng.uniform(0.5, 2)
            est = estimate(name, p=8, m=32, v=v, fwd_s=f, bwd_input_s=2 * f, bwd_weight_s=f, p2p_s=0.01 * f)
            assert not est.timeline, name


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_step_time_is_estimates_step_time_exactly(name):
    """closed_form.step_time (what the cost model calls for the no-p2p step) is estimate's number, bit for
    bit, with uniform and with per-chunk times, and rejects what estimate rejects."""
    rng = random.Random(7)
    cases = [case for case in GRID if case[0] == name]
    assert cases
    for _, p, m, v in cases:
        count = p * v
        for f, b, w, c in TIMES:
            per_chunk = [round(f * rng.uniform(0.5, 1.5), 3) for _ in range(count)]
            for fwd in (f, per_chunk):
                kwargs = dict(p=p, m=m, v=v, fwd_s=fwd, bwd_input_s=b, bwd_weight_s=w, p2p_s=c)
                assert cf.step_time(name, **kwargs) == estimate(name, **kwargs).step_time_s
    _, p, m, v = cases[0]
    with pytest.raises(ValueError, match="fwd_s"):
        cf.step_time(name, p=p, m=m, v=v, fwd_s=[1.0] * (p * v + 1), bwd_input_s=1.0, bwd_weight_s=1.0)


def test_in_flight_per_device_is_in_flight_of_each_device():
    for name, p, m, v in GRID:
        expected = tuple(in_flight(name, p=p, m=m, v=v, device=d) for d in range(p))
        assert cf.in_flight_per_device(name, p=p, m=m, v=v) == expected
    with pytest.raises(ValueError):
        cf.in_flight_per_device("1f1b", p=2, m=1, v=3)  # 1F1B has one chunk per device
