"""Names, order and metadata the rest of the planner depends on."""

from __future__ import annotations

from planner.schedules import SCHEDULE_NAMES, get_schedule


def test_names_and_order():
    assert SCHEDULE_NAMES == (
        "gpipe",
        "1f1b",
        "interleaved-1f1b",
        "pipedream",
        "pipedream-2bw",
        "chimera",
        "zb-h1",
        "zb-h2",
        "zb-v",
        "dualpipe-v",
        "pipelined-backprop",
        "pipemare",
    )


def test_metadata():
    torch = {n: get_schedule(n).torch_class for n in SCHEDULE_NAMES}
    assert torch == {
        "gpipe": "ScheduleGPipe",
        "1f1b": "Schedule1F1B",
        "interleaved-1f1b": "ScheduleInterleaved1F1B",
        "pipedream": None,
        "pipedream-2bw": None,
        "chimera": None,
        "zb-h1": "ScheduleInterleavedZeroBubble",
        "zb-h2": None,
        "zb-v": "ScheduleZBVZeroBubble",
        "dualpipe-v": "ScheduleDualPipeV",
        "pipelined-backprop": None,
        "pipemare": None,
    }
    assert get_schedule("gpipe").torch_class_for(2) == "ScheduleLoopedBFS"
    asynchronous = {n for n in SCHEDULE_NAMES if not get_schedule(n).synchronous}
    assert asynchronous == {"pipedream", "pipedream-2bw", "pipelined-backprop", "pipemare"}
    split = {n for n in SCHEDULE_NAMES if get_schedule(n).splits_backward}
    assert split == {"zb-h1", "zb-h2", "zb-v", "dualpipe-v"}
    chunks = {n: get_schedule(n).chunks_per_device for n in SCHEDULE_NAMES}
    assert chunks["zb-v"] == chunks["dualpipe-v"] == 2
    assert chunks["gpipe"] is None and chunks["interleaved-1f1b"] is None and chunks["1f1b"] == 1
    for name in SCHEDULE_NAMES:
        info = get_schedule(name)
        assert info.paper and info.url.startswith("https://") and info.description and info.memory
        assert (info.async_semantics is None) == info.synchronous
    assert "warm-up" in get_schedule("pipemare").async_semantics
    assert "discrepancy correction" in get_schedule("pipemare").async_semantics.lower()
    assert "vertical sync" in get_schedule("pipedream").async_semantics
    assert "2 weight versions" in get_schedule("pipedream-2bw").async_semantics
    assert get_schedule("pipemare").extra_param_buffers == 1


def test_package_stays_light_to_import():
    """No torch anywhere in planner/schedules; matplotlib only inside plot_timeline."""
    from pathlib import Path

    import planner.schedules as pkg

    for path in Path(pkg.__file__).parent.glob("*.py"):
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path.name
        assert "import numpy" not in text, path.name
        for line in text.splitlines():
            if "import matplotlib" in line:
                assert path.name == "plot.py" and line.startswith("    "), f"{path.name}: {line}"
