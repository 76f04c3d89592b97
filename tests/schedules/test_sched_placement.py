"""chunk_devices equals the placement of the real program for every schedule and size."""

import pytest

from planner.schedules import SCHEDULE_NAMES, chunk_devices, get_schedule


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
@pytest.mark.parametrize("p", [2, 4, 5])
def test_placement_matches_built_program(name, p):
    info = get_schedule(name)
    for v in ([info.chunks_per_device] if info.chunks_per_device else [1, 2]):
        m = 2 * p * v
        try:
            info.validate(p, m, v)
        except ValueError:
            continue
        assert chunk_devices(name, p, v) == tuple(info.build(p, m, v).placements[0])


def test_v_shapes_fold_back():
    assert chunk_devices("zb-v", 4, 2) == (0, 1, 2, 3, 3, 2, 1, 0)
    assert chunk_devices("interleaved-1f1b", 4, 2) == (0, 1, 2, 3, 0, 1, 2, 3)
