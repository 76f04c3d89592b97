"""What executes each schedule: the one table that the planner and the runtime both read.

The runtime (``runtime/pipeline_parallel.py``) runs a plan's schedule either with a class of
``torch.distributed.pipelining`` or, where torch has no class with the planner's order, by handing the
planner's own :class:`~planner.schedules.actions.Program` to torch's ``_PipelineScheduleRuntime``
(:data:`PROGRAM`). A row says which runner runs ``v = 1`` and which runs ``v > 1`` chunks per device
(``None``: the runtime does not run that case), how stages are laid out on the devices, and what the
runner needs beyond the planner's own ``(p, m, v)`` rules (:meth:`ScheduleInfo.validate
<planner.schedules.registry.ScheduleInfo.validate>`). Schedules without a row (the asynchronous ones
and Chimera) are planned and simulated, and the runtime refuses them.

Simulated = executed: ``tests/runtime/test_schedule_orders.py`` checks, for every row and several
``(p, m, v)``, that the compute actions each rank executes are the planner's program, action for
action. The action letters are torch's (``F``, ``I`` input gradient, ``W`` weight gradient, ``B`` full
backward), so the two print the same.

Pure data: no torch import (``planner/`` never imports ``torch.distributed``); the class names are
looked up by the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass

PROGRAM = "program"  # the planner's action list, executed by torch's _PipelineScheduleRuntime


@dataclass(frozen=True, kw_only=True)
class ScheduleRunner:
    """How the runtime executes one schedule.

    ``one_chunk`` runs ``v = 1`` and ``multi_chunk`` runs ``v > 1``: a torch class name, :data:`PROGRAM`,
    or ``None`` where the runtime does not run that case. ``v_shaped``: stage ``k`` sits on device ``k``
    for ``k < p`` and on ``2p - 1 - k`` after (ZB-V, DualPipe-V); otherwise on ``k mod p`` (the loop).
    ``needs_m_at_least_stages``: the torch class refuses fewer micro-batches than stages (``p * v``).
    ``single_stage``: the ``v = 1`` class takes one stage per rank (torch's ``PipelineScheduleSingle``),
    not a list. ``same_order_as``: for :data:`PROGRAM` rows, a torch class whose order equals the
    planner's (tested), kept as the reference the papers' implementation is compared with.
    """

    schedule: str
    one_chunk: str | None
    multi_chunk: str | None
    v_shaped: bool = False
    needs_m_at_least_stages: bool = False
    single_stage: bool = False
    same_order_as: str | None = None

    def runner_for(self, v: int) -> str | None:
        """The torch class name or :data:`PROGRAM` that runs ``v`` chunks per device; ``None``: not run."""
        return self.one_chunk if v == 1 else self.multi_chunk

    def torch_class_for(self, v: int) -> str | None:
        """The torch class with this schedule's order for ``v`` (a program row: ``same_order_as``)."""
        runner = self.runner_for(v)
        return self.same_order_as if runner == PROGRAM else runner


RUNNERS: tuple[ScheduleRunner, ...] = (
    # torch's ScheduleGPipe for one stage per rank; with v > 1 chunks, breadth first: ScheduleLoopedBFS.
    ScheduleRunner(schedule="gpipe", one_chunk="ScheduleGPipe", multi_chunk="ScheduleLoopedBFS", single_stage=True),
    ScheduleRunner(schedule="1f1b", one_chunk="Schedule1F1B", multi_chunk=None, single_stage=True,
                   needs_m_at_least_stages=True),
    ScheduleRunner(schedule="interleaved-1f1b", one_chunk=None, multi_chunk="ScheduleInterleaved1F1B"),
    # ZB-H1's order equals torch's ScheduleInterleavedZeroBubble with one chunk per device (tested), but that class
    # refuses an m that is not a multiple of m // p (p=2, m=5), so the runtime runs the planner's program, as for
    # ZB-H2, for which torch has no class.
    ScheduleRunner(schedule="zb-h1", one_chunk=PROGRAM, multi_chunk=None,
                   same_order_as="ScheduleInterleavedZeroBubble"),
    ScheduleRunner(schedule="zb-h2", one_chunk=PROGRAM, multi_chunk=None),
    ScheduleRunner(schedule="zb-v", one_chunk=None, multi_chunk="ScheduleZBVZeroBubble", v_shaped=True),
    ScheduleRunner(schedule="dualpipe-v", one_chunk=None, multi_chunk="ScheduleDualPipeV", v_shaped=True,
                   needs_m_at_least_stages=True),
)

_BY_NAME: dict[str, ScheduleRunner] = {r.schedule: r for r in RUNNERS}
RUNTIME_SCHEDULES: tuple[str, ...] = tuple(_BY_NAME)


def runner(name: str) -> ScheduleRunner | None:
    """The row of schedule ``name``, or ``None`` when the runtime does not run it."""
    return _BY_NAME.get(name)


def runtime_refusal(name: str, p: int, m: int, v: int) -> str | None:
    """Why the runtime cannot run schedule ``name`` at ``(p, m, v)``, or ``None`` when it can.

    The search skips the counts a runtime schedule refuses (the plan is executed as written, never
    re-decided); schedules the runtime does not run at all are still planned when asked for (simulated,
    and refused by the runtime with this reason); ``evaluate`` prices any valid count, for comparison.
    """
    row = runner(name)
    if row is None:
        return f"the runtime does not run schedule {name!r}"
    if row.runner_for(v) is None:
        return f"the runtime runs {name!r} only with {'one chunk' if v > 1 else 'several chunks'} per device"
    if row.needs_m_at_least_stages and p > 1 and m < p * v:
        return (f"torch's {row.runner_for(v)} needs at least as many micro-batches as stages "
                f"({p * v}); got {m}")
    return None


def runs_in_runtime(name: str) -> bool:
    """Whether the runtime runs schedule ``name`` at all (it has a row here)."""
    return name in _BY_NAME


def search_skips(name: str, p: int, m: int, v: int) -> bool:
    """Whether the search leaves ``(name, p, m, v)`` out: a schedule the runtime runs, at a count it refuses.
    Schedules the runtime does not run at all are still searched when asked for (simulated, refused later)."""
    return p > 1 and runs_in_runtime(name) and runtime_refusal(name, p, m, v) is not None
