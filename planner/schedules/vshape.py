"""V-shaped schedules: two chunks per device, the model goes down the devices and comes back up.

Device ``d`` holds stage ``d`` (chunk 0) and stage ``2p - 1 - d`` (chunk 1), so device 0 runs both the
first and the last chunk: the loss is computed where the pipeline started and the first backward
starts without a trip back across the devices. Both orders below are written as phases of per-chunk
counters, following the descriptions in the papers:

* ZB-V (Qi et al. 2023, section 6): warm-up with chunk-0 forwards, then the steady pattern
  ``F0 I0 W0 F1 I1 W1``; the cool-down runs the input-gradient passes first and the postponed ``W``
  last. Peak activations equal 1F1B's. For ``m < 2p - 1`` the order for ``2p - 1`` micro-batches
  is written and the missing micro-batches are dropped (as torch does).
* DualPipe-V (DeepSeek-V3 report; the "cut-in-half" DualPipe): same placement, the steady phase
  pairs a forward of one chunk with a full backward of the other (DeepSeek overlaps their compute
  and all-to-all; we model no overlap, the pair runs back to back), and zero-bubble ``I``/``W``
  splits only where they fill the warm-up and cool-down. Needs ``m >= 2p``.
"""

from __future__ import annotations

from collections import deque

from planner.schedules.actions import Action, Program


def v_placement(p: int) -> tuple[int, ...]:
    return tuple(k if k < p else 2 * p - 1 - k for k in range(2 * p))


class _Counters:
    """Next micro-batch per (chunk, kind) on one device, and the actions written so far."""

    def __init__(self, stages: tuple[int, int]) -> None:
        self.stages = stages
        self.next: dict[tuple[int, str], int] = {}
        self.actions: list[Action] = []

    def count(self, chunk: int, kind: str) -> int:
        return self.next.get((chunk, kind), 0)

    def emit(self, chunk: int, kind: str) -> int:
        """Append ``kind`` of ``chunk`` for its next micro-batch (``I``/``B`` share a counter)."""
        counter = "I" if kind in ("I", "B") else kind
        mb = self.count(chunk, counter)
        self.next[(chunk, counter)] = mb + 1
        self.actions.append(Action(self.stages[chunk], kind, mb))
        return mb

    def weight(self, chunk: int, mb: int) -> None:
        self.actions.append(Action(self.stages[chunk], "W", mb))


def zb_v(p: int, m: int) -> Program:
    n = max(m, 2 * p - 1)
    programs = []
    for d in range(p):
        c = _Counters((d, 2 * p - 1 - d))
        for _ in range(2 * (p - d) - 1):
            c.emit(0, "F")
        for _ in range(d):
            c.emit(1, "F")
            c.emit(0, "F")
        for _ in range(p - d):
            c.emit(1, "F")
            c.weight(1, c.emit(1, "I"))
        while c.count(1, "F") < c.count(0, "F") or c.count(0, "F") < n:
            if c.count(0, "F") < n:
                c.emit(0, "F")
            c.weight(0, c.emit(0, "I"))
            c.emit(1, "F")
            c.weight(1, c.emit(1, "I"))
        # Cool-down: input-gradients first so the previous device is not kept waiting; W last.
        late0: deque[int] = deque()
        late1: deque[int] = deque()
        for _ in range(d):
            late0.append(c.emit(0, "I"))
            late1.append(c.emit(1, "I"))
        for _ in range(p - d):
            late0.append(c.emit(0, "I"))
            c.weight(0, late0.popleft())
        for mb in late1:
            c.weight(1, mb)
        for mb in late0:
            c.weight(0, mb)
        programs.append(tuple(a for a in c.actions if a.microbatch < m))
    return Program((v_placement(p),), tuple(programs), m)


def dualpipe_v(p: int, m: int) -> Program:
    programs = []
    for d in range(p):
        c = _Counters((d, 2 * p - 1 - d))
        late: deque[tuple[int, int]] = deque()  # postponed W, oldest first, both chunks

        def backward(chunk: int, split: bool, *, c: _Counters = c, late: deque = late) -> None:
            if split:
                late.append((chunk, c.emit(chunk, "I")))
            else:
                c.emit(chunk, "B")

        def one_late_weight(*, c: _Counters = c, late: deque = late) -> None:
            if late:
                c.weight(*late.popleft())

        for _ in range(2 * (p - d - 1)):
            c.emit(0, "F")
        for _ in range(d + 1):
            c.emit(0, "F")
            c.emit(1, "F")
        for _ in range(p - d - 1):
            backward(1, True)
            one_late_weight()
            c.emit(1, "F")
        for _ in range(m - 2 * p + d + 1):
            c.emit(0, "F")
            c.emit(1, "B")
            c.emit(1, "F")
            c.emit(0, "B")
        for _ in range(p - d - 1):
            c.emit(1, "B")
            c.emit(1, "F")
            c.emit(0, "B")
        # Cool-down: full backwards first, then zero-bubble B (W postponed) from the middle on.
        split = False
        half = (d + 1) // 2
        for i in range(d + 1):
            if i == half and d % 2 == 1:
                split = True
            backward(1, split)
            if i == half and d % 2 == 0:
                split = True
            backward(0, split)
        for _ in range(p - d - 1):
            one_late_weight()
            backward(0, split)
        while late:
            one_late_weight()
        programs.append(tuple(c.actions))
    return Program((v_placement(p),), tuple(programs), m)
