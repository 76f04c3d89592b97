"""Pipeline parallelism over the ``pp`` mesh axis with ``torch.distributed.pipelining``.

Each of the plan's stages becomes a ``PipelineStage`` built by hand from its :class:`StageModule`
(no tracing), and the plan's schedule name picks what runs them from the one schedule table,
:mod:`planner.schedules.table`: a ``torch.distributed.pipelining`` class (GPipe, 1F1B, interleaved
1F1B, ZB-V, DualPipe-V; Looped BFS for GPipe with ``virtual_stages > 1``), or the planner's own action
list executed by torch's ``_PipelineScheduleRuntime`` (ZB-H1, ZB-H2). Both sides use torch's action
letters (``F``, ``I`` input gradient, ``W`` weight gradient, ``B`` full backward), and
``tests/runtime/test_schedule_orders.py`` checks that what each rank executes is the planner's order.

The asynchronous methods (pipedream, pipedream-2bw, pipelined-backprop, pipemare) update weights
without a flush, and chimera runs two model replicas; the runtime refuses all of them rather than run
a different schedule. Every schedule gets the plan's ``num_micro_batches`` and averages the
micro-batch gradients (``scale_grads=True``), so a step equals one step on the whole batch.

What crosses a stage boundary is one block's output, ``[micro_batch, seq, hidden]`` in fp32 (the
residual stream; bf16 autocast leaves it fp32). With sequence parallelism each tp rank holds only its
``seq / tp`` positions of it, and stages exchange that **shard**: tp rank ``t`` of stage ``k`` sends
to tp rank ``t`` of stage ``k + 1`` (the ``pp`` axis groups ranks of equal tp index), which reads it
as the same shard. Gathering before the send and splitting after would send ``tp`` times the bytes
to get the same result (Megatron-SP also sends the shard). For the GPT family the runtime gives
``PipelineStage`` these shapes (:func:`stage_io_examples`: tokens into the first stage, the boundary
tensor between stages, logits out of the last), so torch's static metadata path sets up the p2p
buffers without a first inference forward; other families let torch infer them from that forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining import schedules as torch_schedules
from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

from planner.errors import PlannerError
from planner.models import ModelPreset
from planner.plan import Plan
from planner.schedules import get_schedule
from planner.schedules.table import PROGRAM, RUNTIME_SCHEDULES
from runtime.errors import RunCheckError
from runtime.rank_layout import RankLayout

SUPPORTED_SCHEDULES = RUNTIME_SCHEDULES  # the rows of planner.schedules.table


@dataclass(frozen=True)
class ScheduleChoice:
    name: str
    torch_class: str | None  # None: run the planner's action list
    stage_to_pp_index: dict[int, int]

    def describe(self) -> str:
        if self.torch_class:
            return f"{self.name} -> torch {self.torch_class}"
        return f"{self.name} -> planner action list on torch _PipelineScheduleRuntime"


def choose_schedule(plan: Plan) -> ScheduleChoice:
    """The schedule that runs the plan, or a :class:`RunCheckError` naming what is wrong and the fix."""
    p = plan.parallel
    name = p.schedule
    supported = ", ".join(SUPPORTED_SCHEDULES)
    try:
        info = get_schedule(name)
    except ValueError as exc:
        raise RunCheckError(f"parallel.schedule: {exc}; the runtime runs: {supported}") from exc
    if not info.synchronous:
        raise RunCheckError(
            f"parallel.schedule: {name!r} is asynchronous (weights are updated without a pipeline flush), and the "
            f"runtime runs synchronous schedules only: {supported}. Re-plan with one of those "
            "(python -m planner plan … --schedules 1f1b,interleaved-1f1b,zb-v)")
    row = info.runner
    if row is None:
        raise RunCheckError(
            f"parallel.schedule: {name!r} is not supported by the runtime (torch.distributed.pipelining has no "
            f"class for it and it is not a single-replica action list); the runtime runs: {supported}. "
            "Re-plan with one of those.")
    try:
        info.validate(p.pp, p.num_micro_batches, p.virtual_stages)
    except ValueError as exc:
        raise RunCheckError(f"parallel.schedule: {exc}") from exc
    num_stages = p.pp * p.virtual_stages
    runner = row.runner_for(p.virtual_stages)
    assert runner is not None, f"{name}: validate() accepted v={p.virtual_stages}, the table has no runner for it"
    if row.needs_m_at_least_stages and p.num_micro_batches < num_stages:
        raise RunCheckError(
            f"parallel.num_micro_batches: {runner} (what runs {name!r}) needs at least as many micro-batches as "
            f"stages, {num_stages}, and the plan has {p.num_micro_batches}; re-plan with num_micro_batches >= "
            f"{num_stages} or with schedule 'gpipe'")
    if len(plan.stages) != num_stages:
        raise RunCheckError(f"stages: the plan lists {len(plan.stages)} stages but pp x virtual_stages = "
                            f"{p.pp} x {p.virtual_stages} = {num_stages}; re-create the plan")
    if runner == PROGRAM:
        torch_class = None
        program = info.build(p.pp, p.num_micro_batches, p.virtual_stages)
        expected = dict(enumerate(program.placements[0]))
    else:
        torch_class = runner
        expected = generate_stage_to_rank_mapping(p.pp, num_stages, style="v" if row.v_shaped else "loop")
    planned = {s.index: _pp_index_of(plan, s.ranks) for s in plan.stages}
    if planned != expected:
        raise RunCheckError(
            f"stages: the plan puts stages on pipeline positions {planned}, but schedule {name!r} runs stage k on "
            f"position {expected}; the runtime does not move stages the plan placed. Re-create the plan with a "
            "planner that writes this schedule's placement")
    return ScheduleChoice(name=name, torch_class=torch_class, stage_to_pp_index=expected)


def _pp_index_of(plan: Plan, ranks: tuple[int, ...]) -> int:
    """The pipeline position of a plan stage's ranks (:meth:`RankLayout.position_of`), as a run-check error."""
    try:
        return RankLayout.from_plan(plan).position_of(tuple(ranks))
    except PlannerError as exc:
        raise RunCheckError(str(exc)) from None


def boundary_shape(plan: Plan, hidden: int) -> tuple[int, int, int]:
    """``[micro_batch, seq, hidden]`` of the tensor one stage sends the next, on one rank.

    With ``sequence_parallel`` it is this tp rank's shard: ``seq / tp`` positions (see the module docstring);
    with ``cp > 1`` the cp rank's ``seq / cp`` positions (its two chunks), before that split.
    """
    p = plan.parallel
    seq_len = plan.model.seq_len
    if seq_len is None:
        raise RunCheckError(f"model.seq_len: the plan of {plan.model.name} has none; the pipeline needs it to size "
                            "what stages exchange; re-create the plan")
    seq_len //= p.cp  # context parallelism: this cp rank's 2 chunks of every sequence (runtime.context_parallel)
    return (p.micro_batch_size, seq_len // p.tp if p.sequence_parallel else seq_len, hidden)


def stage_io_examples(plan: Plan, preset: ModelPreset, stage_index: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Meta tensors shaped as what stage ``stage_index`` takes and returns (GPT family), else ``None``."""
    if preset.family != "gpt":
        return None
    p = plan.parallel
    last = p.pp * p.virtual_stages - 1
    boundary = torch.empty(boundary_shape(plan, preset.config["hidden"]), device="meta", requires_grad=True)
    # The head runs under the plan's autocast (runtime.step.plan_autocast): bf16 logits on GPUs for bf16 plans.
    logits_dtype = torch.bfloat16 if device.type == "cuda" and plan.model.dtype == "bf16" else torch.float32
    local_seq = plan.model.seq_len // p.cp  # cp > 1: the first stage reads, the last returns, the rank's tokens
    tokens = torch.empty((p.micro_batch_size, local_seq), dtype=torch.long, device="meta")
    logits = torch.empty((p.micro_batch_size, local_seq, preset.config.get("vocab_size", 51200)),
                         dtype=logits_dtype, device="meta", requires_grad=True)
    return (tokens if stage_index == 0 else boundary), (logits if stage_index == last else boundary)


def build_schedule(choice: ScheduleChoice, modules: list[nn.Module], stage_indices: list[int], plan: Plan, *,
                   pp_group: torch.distributed.ProcessGroup, device: torch.device,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], preset: ModelPreset | None = None):
    """``PipelineStage`` per local stage, then the schedule object whose ``step`` runs one batch.

    With ``preset`` the stages get their input and output shapes up front (:func:`stage_io_examples`).
    """
    p = plan.parallel
    num_stages = p.pp * p.virtual_stages
    stages = []
    for module, idx in zip(modules, stage_indices):
        io = stage_io_examples(plan, preset, idx, device) if preset is not None else None
        inputs, outputs = io if io is not None else (None, None)
        stages.append(PipelineStage(module, idx, num_stages, device, input_args=inputs, output_args=outputs,
                                    group=pp_group))
    m = p.num_micro_batches
    if choice.torch_class is None:
        return program_schedule(choice.name, stages, p.pp, m, p.virtual_stages, loss_fn=loss_fn), stages
    cls = getattr(torch_schedules, choice.torch_class)
    if issubclass(cls, torch_schedules.PipelineScheduleSingle):
        assert len(stages) == 1, "a single-stage schedule got several stages on one rank"
        return cls(stages[0], m, loss_fn=loss_fn, scale_grads=True), stages
    return cls(stages, m, loss_fn=loss_fn, scale_grads=True), stages


def program_order(name: str, pp: int, num_micro_batches: int, virtual_stages: int
                  ) -> dict[int, list[torch_schedules._Action]]:
    """The planner's program of ``name`` as torch actions, per pipeline rank: the letters are the same."""
    program = get_schedule(name).build(pp, num_micro_batches, virtual_stages)
    return {d: [torch_schedules._Action(a.stage, torch_schedules._ComputationType(a.kind), a.microbatch)
                for a in acts] for d, acts in enumerate(program.actions)}


def program_schedule(name: str, stages: list, pp: int, num_micro_batches: int, virtual_stages: int, *,
                     loss_fn: Callable | None) -> torch_schedules._PipelineScheduleRuntime:
    """torch's ``_PipelineScheduleRuntime`` executing the planner's program (the table's ``program`` rows)."""
    sched = torch_schedules._PipelineScheduleRuntime(stages, num_micro_batches, loss_fn=loss_fn, scale_grads=True)
    order = program_order(name, pp, num_micro_batches, virtual_stages)
    sched.pipeline_order = order
    sched._validate_and_set_stage_mapping(order)
    sched._prepare_schedule_with_comms(order)
    return sched
