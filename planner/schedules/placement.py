"""Which device runs each model chunk, as the schedule lays it out.

Loop schedules put chunk ``j`` on device ``j % p``; V-shaped ones (ZB-V, DualPipe-V) fold the
second half back: chunks ``0 … p-1`` on devices ``0 … p-1`` and ``p … 2p-1`` on ``p-1 … 0``.
Everything that sums work or memory per device (cost model, search bounds, plan stages) must use
this map, never ``j % p``.
"""

from __future__ import annotations

import functools

from planner.schedules.registry import get_schedule


@functools.lru_cache(maxsize=4096)
def chunk_devices(name: str, p: int, v: int = 1) -> tuple[int, ...]:
    """Device of each of the ``p·v`` chunks in model order (the first replica's, for Chimera)."""
    info = get_schedule(name)
    m = 2 * p * max(v, 1)
    return tuple(info.build(p, m, v).placements[0])
