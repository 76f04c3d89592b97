"""Which device runs each model chunk, as the schedule lays it out.

Loop schedules put chunk ``j`` on device ``j % p``; V-shaped ones (ZB-V, DualPipe-V) fold the
second half back: chunks ``0 … p-1`` on devices ``0 … p-1`` and ``p … 2p-1`` on ``p-1 … 0``.
Everything that sums work or memory per device (cost model, search bounds, plan stages) must use
this map, never ``j % p``.

The shape is read off a small pipeline (building a program for a large one costs seconds) and
then generated for any ``p``; an unrecognised shape falls back to building the real program.
"""

from __future__ import annotations

import functools

from planner.schedules.registry import get_schedule

_PROBE_P = 3


def _loop(p: int, v: int) -> tuple[int, ...]:
    return tuple(j % p for j in range(p * v))


def _vee(p: int, v: int) -> tuple[int, ...]:
    return tuple(j % p if (j // p) % 2 == 0 else p - 1 - j % p for j in range(p * v))


@functools.lru_cache(maxsize=256)
def _built(name: str, p: int, v: int) -> tuple[int, ...]:
    return tuple(get_schedule(name).build(p, 2 * p * max(v, 1), v).placements[0])


@functools.lru_cache(maxsize=4096)
def chunk_devices(name: str, p: int, v: int = 1) -> tuple[int, ...]:
    """Device of each of the ``p·v`` chunks in model order (the first replica's, for Chimera)."""
    if v == 1:
        return _loop(p, 1)
    probe = _built(name, _PROBE_P, v)
    for shape in (_loop, _vee):
        if probe == shape(_PROBE_P, v):
            return shape(p, v)
    return _built(name, p, v)
