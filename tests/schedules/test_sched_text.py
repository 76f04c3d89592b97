"""The text form of actions and whole programs prints and parses back to the same data."""

from __future__ import annotations

import pytest

from planner.schedules import (
    SCHEDULE_NAMES,
    Action,
    format_actions,
    get_schedule,
    parse_actions,
    parse_program,
    simulate,
)


def test_action_text_examples():
    assert str(Action(2, "F", 0)) == "2F0"
    assert str(Action(1, "B", 3)) == "1B3"  # torch's letters: B the full backward, I input only
    assert Action.parse("12W105") == Action(12, "W", 105)
    assert Action.parse(" 0I7 ") == Action(0, "I", 7)
    assert parse_actions("0F0, 0F1 1B0") == (Action(0, "F", 0), Action(0, "F", 1), Action(1, "B", 0))


@pytest.mark.parametrize("bad", ["", "F0", "2X0", "2F", "a2F0", "2FW0", "-1F0", "1BW3"])
def test_bad_action_text_is_rejected(bad):
    with pytest.raises(ValueError, match="action"):
        Action.parse(bad)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_every_program_round_trips(name):
    info = get_schedule(name)
    v = info.chunks_per_device or info.min_v
    for p in (2, 4):
        m = max(2 * p, info.min_microbatches(p))
        program = info.build(p, m, v)
        text = program.to_text()
        assert parse_program(text) == program
        for device_actions in program.actions:
            assert parse_actions(format_actions(device_actions)) == device_actions
        assert text.splitlines()[1].startswith("d0: ")


def test_chimera_program_text_carries_both_replicas():
    program = get_schedule("chimera").build(4, 4, 1)
    head = program.to_text().splitlines()[0]
    assert head == "# stages->devices: 0 1 2 3 | 3 2 1 0; microbatches: 4; replica of microbatch: 0 0 1 1"
    assert parse_program(program.to_text()).replica_of == (0, 0, 1, 1)


def test_1f1b_text_is_the_familiar_order():
    program = get_schedule("1f1b").build(2, 3, 1)
    assert program.to_text().splitlines()[1:] == [
        "d0: 0F0 0F1 0B0 0F2 0B1 0B2",
        "d1: 1F0 1B0 1F1 1B1 1F2 1B2",
    ]


def test_grid_text_shows_every_action_once():
    r = simulate("zb-h1", p=3, m=4, fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=1.0)
    grid = r.to_text()
    cells = [c.strip() for line in grid.splitlines()[2:] for c in line.split("|")[1:]]
    actions = sorted(c for c in cells if c and c != ".")
    assert actions == sorted(str(a) for device in r.program.actions for a in device)
    assert grid.splitlines()[0].startswith("zb-h1 p=3 m=4 v=1 step=")
