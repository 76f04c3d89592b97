"""Bad input raises ValueError naming the field, the value and the fix."""

from __future__ import annotations

import pytest

from planner.schedules import SCHEDULE_NAMES, estimate, get_schedule, in_flight, simulate

UNIT = dict(fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=1.0)


def test_unknown_schedule_names_the_valid_ones_and_suggests_one():
    with pytest.raises(ValueError) as err:
        get_schedule("1f1b-interleaved")
    msg = str(err.value)
    assert "schedule" in msg and "did you mean 'interleaved-1f1b'" in msg
    assert all(name in msg for name in SCHEDULE_NAMES)
    with pytest.raises(ValueError, match="did you mean 'zb-h1'"):
        simulate("zbh1", p=2, m=2, **UNIT)


@pytest.mark.parametrize("call", [simulate, estimate])
@pytest.mark.parametrize(
    ("kwargs", "field", "fix"),
    [
        (dict(p=0, m=4), "p", "p >= 1"),
        (dict(p=-2, m=4), "p", "p >= 1"),
        (dict(p=2.0, m=4), "p", "positive integer"),
        (dict(p=4, m=0), "m", "m >= 1"),
        (dict(p=4, m=4, v=0), "v", "v >= 1"),
    ],
)
def test_bad_sizes(call, kwargs, field, fix):
    with pytest.raises(ValueError) as err:
        call("1f1b", **kwargs, **UNIT)
    assert str(err.value).startswith(f"{field}:") and fix in str(err.value)


@pytest.mark.parametrize(
    ("name", "p", "m", "v", "field", "fix"),
    [
        ("1f1b", 4, 8, 2, "v", "set v=1 or pick 'interleaved-1f1b'"),
        ("zb-v", 4, 8, 1, "v", "set v=2"),
        ("dualpipe-v", 4, 8, 3, "v", "set v=2"),
        ("interleaved-1f1b", 4, 8, 1, "v", "v >= 2"),
        ("interleaved-1f1b", 4, 6, 2, "m", "multiple of p=4; use m=8"),
        ("chimera", 3, 6, 1, "p", "even p"),
        ("chimera", 4, 2, 1, "m", "m >= 4"),
        ("chimera", 4, 6 + 4, 1, "m", "use m=12"),
        ("dualpipe-v", 4, 7, 2, "m", "m >= 8"),
        ("pipedream-2bw", 4, 3, 1, "m", "m >= 4"),
    ],
)
def test_schedule_constraints(name, p, m, v, field, fix):
    with pytest.raises(ValueError) as err:
        simulate(name, p=p, m=m, v=v, **UNIT)
    msg = str(err.value)
    assert msg.startswith(f"{field}:") and fix in msg and name in msg


def test_bad_stage_times():
    with pytest.raises(ValueError, match=r"fwd_s.*p\*v = 4"):
        simulate("1f1b", p=4, m=4, fwd_s=[1.0, 1.0], bwd_input_s=1.0, bwd_weight_s=1.0)
    with pytest.raises(ValueError, match="fwd_s.*positive"):
        simulate("1f1b", p=2, m=4, fwd_s=0.0, bwd_input_s=1.0, bwd_weight_s=1.0)
    with pytest.raises(ValueError, match="bwd_weight_s.*non-negative"):
        estimate("gpipe", p=2, m=4, fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=[1.0, float("nan")])
    with pytest.raises(ValueError, match="p2p_s"):
        simulate("1f1b", p=2, m=4, p2p_s=-1.0, **UNIT)


def test_bad_device():
    with pytest.raises(ValueError, match=r"device: got 4; expected an integer in \[0, p=4\)"):
        in_flight("1f1b", p=4, m=8, device=4)


def test_min_microbatches_rules():
    assert get_schedule("dualpipe-v").min_microbatches(4) == 8
    assert get_schedule("pipedream-2bw").min_microbatches(6) == 6
    assert get_schedule("1f1b").min_microbatches(6) == 1
