"""The published closed forms, reproduced by the simulator with equal stage times.

Units: every (full) stage takes F = 1; fused schedules get B = 2 as B = W = 1 (they run B + W as one
pass), split schedules get B = 1, W = 1. Each test asserts numbers, so a schedule whose order drifts
from the paper fails here.
"""

from __future__ import annotations

import math

import pytest

from planner.schedules import simulate

UNIT = dict(fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=1.0)


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(name, p, m):
    r = simulate(name, p=p, m=m, **UNIT)
    assert r.step_time_s == pytest.approx((m + p - 1) * 3.0, abs=1e-12)
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1), abs=1e-12)


@pytest.mark.parametrize("p", [2, 4, 8])
@pytest.mark.parametrize("v", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_interleaved_bubble_is_p_minus_1_over_v_m_of_the_ideal_time(p, v, k):
    m = k * p
    # A chunk holds 1/v of a stage: F = 1/v, B = W = 1/v (fused backward 2/v).
    r = simulate("interleaved-1f1b", p=p, m=m, v=v, fwd_s=1 / v, bwd_input_s=1 / v, bwd_weight_s=1 / v)
    ideal = m * 3.0
    assert (r.step_time_s - ideal) / ideal == pytest.approx((p - 1) / (v * m), abs=1e-12)
    # ... which beats plain 1F1B's (p - 1) / m by the factor v.
    plain = simulate("1f1b", p=p, m=m, **UNIT)
    assert (plain.step_time_s - ideal) / ideal == pytest.approx((p - 1) / m, abs=1e-12)


@pytest.mark.parametrize("p", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_1f1b_first_device_holds_p_micro_batches_gpipe_holds_m(p, m):
    one = simulate("1f1b", p=p, m=m, **UNIT)
    gpipe = simulate("gpipe", p=p, m=m, **UNIT)
    assert one.peak_in_flight == tuple(float(min(p - d, m)) for d in range(p))
    assert gpipe.peak_in_flight == (float(m),) * p


@pytest.mark.parametrize("p", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("m", [1, 2, 4, 8, 16, 32])
def test_zb_h1_idle_time_is_a_third_of_1f1b(p, m):
    """With F = B = W the idle time per device is (p-1)F for ZB-H1 and 3(p-1)F for 1F1B once m >= p.

    Tolerance derived: the *idle time* ratio is exactly 1/3 for m >= p (below, the drain has fewer W
    to fill it and the ratio is larger, <= 2/3). The *bubble fraction* ratio is (m+p-1)/(3m+p-1), i.e.
    1/3 plus at most 2(p-1)/(3(3m+p-1)), which is what we check for every m.
    """
    zb = simulate("zb-h1", p=p, m=m, **UNIT)
    base = simulate("1f1b", p=p, m=m, **UNIT)
    idle_zb, idle_base = zb.step_time_s - 3 * m, base.step_time_s - 3 * m
    assert idle_base == pytest.approx(3 * (p - 1), abs=1e-12)
    if m >= p:
        assert idle_zb == pytest.approx(p - 1, abs=1e-12)
        assert idle_zb / idle_base == pytest.approx(1 / 3, abs=1e-12)
        ratio = zb.bubble_fraction / base.bubble_fraction
        assert ratio == pytest.approx((m + p - 1) / (3 * m + p - 1), abs=1e-12)
        assert 1 / 3 <= ratio <= 1 / 3 + 2 * (p - 1) / (3 * (3 * m + p - 1)) + 1e-12
    else:
        assert 1 / 3 < idle_zb / idle_base <= 2 / 3 + 1e-12
    assert zb.peak_in_flight == (float(min(p, m)),) * p  # never above 1F1B's first device


@pytest.mark.parametrize("p", [2, 3, 4, 6, 8])
def test_zb_h2_is_zero_bubble_once_m_reaches_2p_minus_1(p):
    for m in (2 * p - 1, 2 * p, 4 * p):
        r = simulate("zb-h2", p=p, m=m, **UNIT)
        # The parallelogram: every device works without a gap from its first to its last action...
        assert r.overlapped_bubble_fraction == pytest.approx(0.0, abs=1e-12)
        # ... and only the start offset of (p-1)F remains when steps are separated by a global sync.
        assert r.step_time_s == pytest.approx(3 * m + p - 1, abs=1e-12)
        assert r.peak_in_flight == (float(2 * p - 1),) * p
    short = simulate("zb-h2", p=p, m=2 * p - 2, **UNIT)
    assert short.overlapped_bubble_fraction > 0.01


@pytest.mark.parametrize("p", [4, 6, 8])
def test_zb_v_is_zero_bubble_at_1f1b_memory(p):
    m = 2 * p
    r = simulate("zb-v", p=p, m=m, v=2, fwd_s=0.5, bwd_input_s=0.5, bwd_weight_s=0.5)
    assert r.overlapped_bubble_fraction == pytest.approx(0.0, abs=1e-12)
    assert r.step_time_s == pytest.approx(3 * m + (p - 1) * 0.5, abs=1e-12)
    assert r.peak_in_flight == (float(p),) * p


@pytest.mark.parametrize("p", [2, 4, 6, 8, 10])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_chimera_bubble_and_memory_match_the_paper(p, k):
    """Li & Hoefler: bubble ratio (D-2)/(2N+D-2) with D = p stages and N = m micro-batches per worker,
    forward as long as backward; activations between (D/2+1) and D micro-batches."""
    m = k * p
    r = simulate("chimera", p=p, m=m, fwd_s=1.0, bwd_input_s=0.5, bwd_weight_s=0.5)
    assert r.bubble_fraction == pytest.approx((p - 2) / (2 * m + p - 2), abs=1e-12)
    assert r.weight_versions == (2,) * p
    assert max(r.peak_in_flight) == p
    if k == 1:
        assert r.peak_in_flight[0] == p // 2 + 1
        assert min(r.peak_in_flight) == p // 2 + 1


@pytest.mark.parametrize("p", [2, 3, 4, 6])
@pytest.mark.parametrize("m", [4, 8, 12])
def test_asynchronous_schedules_have_no_bubble_but_stale_weights(p, m):
    m = max(m, p)  # PipeDream-2BW needs m >= p
    results = {
        n: simulate(n, p=p, m=m, **UNIT)
        for n in ("pipedream", "pipedream-2bw", "pipelined-backprop", "pipemare")
    }
    for r in results.values():
        assert r.step_time_s == pytest.approx(3 * m, abs=1e-9)
        assert r.bubble_fraction == pytest.approx(0.0, abs=1e-9)
        assert not r.synchronous
    dream, two, pb, mare = (
        results[n] for n in ("pipedream", "pipedream-2bw", "pipelined-backprop", "pipemare")
    )
    # PipeDream stashes one version per in-flight micro-batch: p on the first stage.
    assert dream.weight_versions == tuple(p - d for d in range(p))
    assert dream.weight_versions[0] == p
    assert dream.staleness == tuple(p - 1 - d for d in range(p))
    # 2BW: two versions, every stage exactly one update stale.
    assert two.weight_versions == (2,) * p
    assert two.staleness == (1,) * p and two.max_staleness == 1
    # Pipelined Backprop: delay 2(p-1-d) updates, 2(p-1-d)+1 micro-batches held, no stash.
    assert pb.staleness == tuple(2 * (p - 1 - d) for d in range(p))
    assert pb.peak_in_flight == tuple(float(2 * (p - 1 - d) + 1) for d in range(p))
    assert pb.weight_versions == (1,) * p
    # PipeMare: same pipeline, one update per step of m micro-batches.
    assert mare.staleness == tuple(math.ceil(2 * (p - 1 - d) / m) for d in range(p))


def test_p2p_latency_costs_1f1b_two_hops_per_micro_batch_but_one_in_p():
    p, m, c = 4, 9, 0.25
    r = simulate("1f1b", p=p, m=m, fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=1.0, p2p_s=c)
    hops = 2 * (p - 1) + 2 * ((m - 1) - math.ceil((m - 1) / p))
    assert r.step_time_s == pytest.approx(3 * (m + p - 1) + hops * c, abs=1e-12)
    assert hops == 18
