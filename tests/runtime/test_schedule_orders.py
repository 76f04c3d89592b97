"""Simulated = executed: what each pipeline rank runs is the order the planner priced, action for action.

For every row of the schedule table (``planner.schedules.table``: every synchronous schedule the
runtime runs) and a grid of ``(p, m, v)``, the compute actions each rank of the runtime executes must
equal the planner's :class:`~planner.schedules.actions.Program` for that device. The runtime's order is
read without processes:

* torch classes with one stage per rank (``ScheduleGPipe``, ``Schedule1F1B``) run their own loop in
  ``_step_microbatches``; we run that loop on a stand-in stage that records each forward and backward
  (no communication, no tensors);
* the multi-stage classes and the planner's own programs (ZB-H1, ZB-H2) run the lowered list
  ``pipeline_order_with_comms``, which their constructor builds for every rank from the stage count and
  the micro-batch count; we build them on stand-in stages of rank 0 and drop the communication actions.
  DualPipe-V's overlapped ``OVERLAP_F_B`` pairs count as their forward then their backward.

Known divergences: none. torch's ``ScheduleLoopedBFS`` (GPipe with ``v > 1``) runs a chunk's backwards
last micro-batch first; the planner's order used to run them first to last and now follows torch (the
simulated times do not change, see ``planner.schedules.orders.gpipe``).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from runtime_plans import make_plan
from torch.distributed.pipelining import schedules as ts
from torch.distributed.pipelining._utils import generate_rank_to_stage_mapping

from planner.schedules import SCHEDULE_NAMES, chunk_devices, get_schedule
from planner.schedules.table import PROGRAM, RUNNERS, RUNTIME_SCHEDULES, runner
from runtime.errors import RunCheckError
from runtime.pipeline_parallel import choose_schedule, program_schedule

_COMPUTE = (ts.FORWARD, ts.BACKWARD_INPUT, ts.BACKWARD_WEIGHT, ts.FULL_BACKWARD)


class _Stage:
    """Stand-in for a ``PipelineStage``: what the schedules read, and a log of the compute they ask for."""

    def __init__(self, stage_index: int, num_stages: int, group_rank: int, group_size: int) -> None:
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_rank, self.group_size = group_rank, group_size
        self.is_first, self.is_last = stage_index == 0, stage_index == num_stages - 1
        self.submod = torch.nn.Identity()
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.log: list[str] = []

    def forward_one_chunk(self, mb: int, *args, **kwargs) -> None:
        self.log.append(f"{self.stage_index}F{mb}")

    def backward_one_chunk(self, mb: int, **kwargs) -> None:
        self.log.append(f"{self.stage_index}B{mb}")

    def get_fwd_recv_ops(self, mb: int) -> list:
        return []

    get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = get_fwd_recv_ops

    def perform_reduce_grad(self, scale: int) -> None:
        pass


def _lowered(order: dict[int, list]) -> dict[int, list[str]]:
    """The compute actions of a lowered (compute + comms) order; an overlapped pair counts as its parts."""
    out = {}
    for rank, actions in order.items():
        flat = []
        for a in actions:
            if a.computation_type == ts.OVERLAP_F_B:
                flat += [str(sub) for sub in a.sub_actions]
            elif a.computation_type in _COMPUTE:
                flat.append(str(a))
        out[rank] = flat
    return out


def executed_order(name: str, p: int, m: int, v: int) -> dict[int, list[str]]:
    """rank -> the compute actions the runtime executes for schedule ``name``, in torch's text form."""
    row = runner(name)
    run_by = row.runner_for(v)
    num_stages = p * v
    style = "v" if row.v_shaped else "loop"
    rank0 = [_Stage(k, num_stages, 0, p) for k in generate_rank_to_stage_mapping(p, num_stages, style=style)[0]]
    if run_by == PROGRAM:
        return _lowered(program_schedule(name, rank0, p, m, v, loss_fn=None).pipeline_order_with_comms)
    cls = getattr(ts, run_by)
    if issubclass(cls, ts.PipelineScheduleMulti):
        return _lowered(cls(rank0, m).pipeline_order_with_comms)
    out = {}
    for rank in range(p):
        stage = _Stage(rank, p, rank, p)
        sched = cls(stage, m)
        # Metadata and p2p set up already, and a backward to run: the loop goes straight to the compute.
        sched._has_backward = sched._stage_forward_initialized = sched._stage_backward_initialized = True
        sched._step_microbatches()
        out[rank] = stage.log
    return out


def planned_order(name: str, p: int, m: int, v: int) -> dict[int, list[str]]:
    program = get_schedule(name).build(p, m, v)
    return {d: [str(a) for a in actions] for d, actions in enumerate(program.actions)}


def _cases() -> list[tuple[str, int, int, int]]:
    cases = []
    for name in RUNTIME_SCHEDULES:
        info = get_schedule(name)
        for p in (2, 3, 4):
            for v in (1, 2, 3):
                for m in sorted({p, 2 * p, 3 * p, p + 1, 2 * p - 1}):
                    if runner(name).runner_for(v) is None:
                        continue
                    try:
                        info.validate(p, m, v)
                    except ValueError:
                        continue
                    if runner(name).needs_m_at_least_stages and m < p * v:
                        continue
                    cases.append((name, p, m, v))
    return cases


CASES = _cases()


def test_the_grid_covers_every_runtime_schedule_with_p_2_and_4():
    covered = {(name, p) for name, p, _, _ in CASES}
    assert {(name, p) for name in RUNTIME_SCHEDULES for p in (2, 4)} <= covered
    assert {v for name, _, _, v in CASES if name == "gpipe"} == {1, 2, 3}
    assert {v for name, _, _, v in CASES if name == "interleaved-1f1b"} == {2, 3}
    assert len(CASES) >= 60


@pytest.mark.parametrize("name, p, m, v", CASES, ids=[f"{n}-p{p}-m{m}-v{v}" for n, p, m, v in CASES])
def test_runtime_executes_the_planned_order(name, p, m, v):
    planned, executed = planned_order(name, p, m, v), executed_order(name, p, m, v)
    assert sorted(executed) == list(range(p))
    for rank in range(p):
        assert executed[rank] == planned[rank], (
            f"{name} p={p} m={m} v={v} rank {rank}:\n  runtime {' '.join(executed[rank])}\n"
            f"  planner {' '.join(planned[rank])}")


@pytest.mark.parametrize("p, m", [(2, 2), (2, 3), (3, 4), (4, 4), (4, 8), (4, 12)])
def test_zb_h1_is_torchs_zero_bubble_class_with_one_chunk(p, m):
    """The table's ``same_order_as``: ZB-H1's program is ScheduleInterleavedZeroBubble's order at v = 1."""
    torch_class = getattr(ts, runner("zb-h1").same_order_as)
    executed = _lowered(torch_class([_Stage(0, p, 0, p)], m).pipeline_order_with_comms)
    assert executed == planned_order("zb-h1", p, m, 1)


def test_zb_h1_runs_as_a_program_because_torchs_class_refuses_some_m():
    """torch's class needs m to be a multiple of m // p; the planner's program runs any m (here p=2, m=5)."""
    with pytest.raises(ValueError, match="multiple of the number of rounds"):
        ts.ScheduleInterleavedZeroBubble([_Stage(0, 2, 0, 2)], 5)
    assert executed_order("zb-h1", 2, 5, 1) == planned_order("zb-h1", 2, 5, 1)


def test_the_table_agrees_with_the_registry_and_with_torch():
    assert set(RUNTIME_SCHEDULES) <= set(SCHEDULE_NAMES)
    assert {n for n in SCHEDULE_NAMES if get_schedule(n).synchronous} - set(RUNTIME_SCHEDULES) == {"chimera"}
    for row in RUNNERS:
        info = get_schedule(row.schedule)
        assert info.synchronous and info.runner is row
        for v in (1, 2, 3):  # every v the planner accepts has a runner; one chunk has one only if accepted
            accepted = info.chunks_per_device in (None, v) and v >= info.min_v
            assert row.runner_for(v) is not None if accepted else v > 1 or row.runner_for(v) is None, (row.schedule, v)
        vee = chunk_devices(row.schedule, 4, 2) == (0, 1, 2, 3, 3, 2, 1, 0)
        assert row.v_shaped == vee, row.schedule
        for v in (1, 2):
            run_by = row.runner_for(v)
            if run_by is None or run_by == PROGRAM:
                continue
            cls = getattr(ts, run_by)
            assert issubclass(cls, ts.PipelineScheduleSingle) == (row.single_stage and v == 1), run_by
        if row.same_order_as is not None:
            assert row.runner_for(1) == PROGRAM and hasattr(ts, row.same_order_as)


@pytest.mark.parametrize("name, p, v", [("1f1b", 4, 1), ("dualpipe-v", 2, 2)])
def test_needs_m_at_least_stages_is_what_torch_refuses(name, p, v):
    assert runner(name).needs_m_at_least_stages
    cls = getattr(ts, runner(name).runner_for(v))
    stages = [_Stage(k, p * v, 0, p) for k in generate_rank_to_stage_mapping(p, p * v, style="v" if v > 1 else "loop")[0]]
    with pytest.raises(ValueError, match="microbatches"):
        cls(stages[0], p * v - 1) if cls is ts.Schedule1F1B else cls(stages, p * v - 1)


def test_1f1b_with_fewer_micro_batches_than_stages_is_refused_with_the_fix():
    plan = make_plan(pp=2, num_micro_batches=1)
    with pytest.raises(RunCheckError, match=r"num_micro_batches: Schedule1F1B .* needs at least as many micro-batches "
                                            r"as stages, 2, and the plan has 1"):
        choose_schedule(plan)
    gpipe = dataclasses.replace(plan, parallel=dataclasses.replace(plan.parallel, schedule="gpipe"))
    assert choose_schedule(gpipe).torch_class == "ScheduleGPipe"
