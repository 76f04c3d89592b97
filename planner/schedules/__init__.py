"""Pipeline schedules as data, an event simulator, and closed forms for the search.

    from planner.schedules import SCHEDULE_NAMES, get_schedule, simulate, estimate
    r = simulate("1f1b", p=4, m=8, fwd_s=1.0, bwd_input_s=1.0, bwd_weight_s=1.0)
    r.step_time_s, r.bubble_fraction, r.peak_in_flight

See docs/schedules.md for every method, its paper and its numbers.
"""

from planner.schedules.actions import Action, Program, format_actions, parse_actions, parse_program
from planner.schedules.closed_form import estimate, in_flight, staleness, weight_versions
from planner.schedules.placement import chunk_devices
from planner.schedules.plot import plot_timeline
from planner.schedules.registry import SCHEDULE_NAMES, ScheduleInfo, get_schedule
from planner.schedules.simulator import SimResult, simulate
from planner.schedules.table import runs_in_runtime, runtime_refusal, search_skips

__all__ = [
    "runs_in_runtime",
    "runtime_refusal",
    "search_skips",
    "SCHEDULE_NAMES",
    "Action",
    "Program",
    "ScheduleInfo",
    "SimResult",
    "chunk_devices",
    "estimate",
    "format_actions",
    "get_schedule",
    "in_flight",
    "parse_actions",
    "parse_program",
    "plot_timeline",
    "simulate",
    "staleness",
    "weight_versions",
]
