"""Pre-flight: everything that must match before a single process trains.

The local launcher runs :func:`preflight` once, before spawning; under ``torchrun`` every rank runs
it before joining the process group. Each failure is a :class:`RunCheckError` that names the
mismatch and the fix: world size, devices per node, model fingerprint, schema version and the plan's
own fingerprint (checked when the plan is read: a plan edited by hand after planning is refused, a
schema 1.x plan runs with a warning that it is unverified), schedule, stage placement, batch,
tensor-parallel divisibility, tied weights, and the checkpoint to resume from.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from planner.errors import PlannerError
from planner.models import ModelPreset
from planner.plan import Plan, PlanEditedError
from planner.trace import trace_model
from runtime import checkpoint as ckpt
from runtime.errors import RunCheckError
from runtime.float8 import check_float8
from runtime.model import check_layer_coverage, resolve_preset, tied_parameters, whole_model_plan
from runtime.parallel_dims import ParallelDims
from runtime.pipeline_parallel import choose_schedule
from runtime.tensor_parallel import check_tensor_parallel


@dataclass(frozen=True)
class Launch:
    """How the processes are laid out: ``nodes`` x ``procs_per_node`` = ``world_size``."""

    world_size: int
    procs_per_node: int
    nodes: int
    device_type: str  # "cuda" or "cpu"


def load_plan(path: str | Path) -> Plan:
    """Read and verify a plan file: a plan whose inputs or predictions were edited after planning is
    refused (:class:`planner.plan.PlanEditedError`, naming the edit and ``evaluate --plan``)."""
    try:
        return Plan.from_json(path)
    except PlanEditedError as exc:
        raise RunCheckError(str(exc)) from exc
    except PlannerError as exc:
        raise RunCheckError(f"plan {path}: {exc}") from exc


def preflight(plan: Plan, launch: Launch, *, preset: ModelPreset | None = None,
              resume_dir: str | None = None, fingerprint: bool = True) -> ModelPreset:
    """Raise :class:`RunCheckError` on the first mismatch; returns the model preset to build.

    ``fingerprint=False`` skips the trace (under torchrun rank 0 alone traces, see :func:`check_fingerprint`).
    """
    ParallelDims.from_plan(plan, launch.world_size)
    _check_cluster(plan, launch)
    preset = resolve_preset(plan, preset)
    if fingerprint:
        check_fingerprint(plan, preset)
    static_checks(plan, preset, device_type=launch.device_type)
    if resume_dir is not None:
        check_manifest_model(ckpt.verify_checkpoint(ckpt.latest_checkpoint(resume_dir)), plan, resume_dir)
    return preset


def check_manifest_model(manifest: dict, plan: Plan, where: object) -> None:
    if manifest.get("model_fingerprint") != plan.model.fingerprint:
        raise RunCheckError(
            f"checkpoint {where}: saved for model {manifest.get('model')!r} (fingerprint "
            f"{manifest.get('model_fingerprint')}) but the plan is for {plan.model.name!r} "
            f"({plan.model.fingerprint}); resume with a plan for the same model, or start without --resume")


def static_checks(plan: Plan, preset: ModelPreset, *, device_type: str) -> None:
    """The checks that need no trace (``train`` runs them on every rank, for API users too)."""
    p = plan.parallel
    if plan.model.global_batch != p.global_batch:
        raise RunCheckError(f"model.global_batch: the plan says {plan.model.global_batch} but dp x micro_batch_size x "
                            f"num_micro_batches = {p.dp} x {p.micro_batch_size} x {p.num_micro_batches} = "
                            f"{p.global_batch}; re-create the plan")
    check_float8(plan, device_type)  # fp8: CUDA with FP8 tensor cores and torchao (runtime/float8.py)
    if device_type == "cuda" and plan.model.dtype == "fp16":
        raise RunCheckError("model.dtype: fp16 training needs loss scaling, which the runtime does not do; "
                            "plan with --dtype bf16 (or fp32)")
    meta = preset.build(device="meta")
    check_layer_coverage(meta, plan)
    if p.pp > 1:
        choose_schedule(plan)
    else:
        if len(plan.stages) != 1:
            raise RunCheckError(f"stages: pp=1 but the plan lists {len(plan.stages)} stages; re-create the plan")
    check_tensor_parallel(plan, preset)
    _check_tied(meta, plan)


ALLOW_MISMATCH_ENV = "RUNTIME_ALLOW_MISMATCH"


def _mismatch(message: str, risk: str) -> None:
    """Refuse a plan that does not match, unless the user chose ``--allow-mismatch``."""
    if os.environ.get(ALLOW_MISMATCH_ENV) == "1":
        print(f"warning: {message}. Running anyway (--allow-mismatch): {risk}", file=sys.stderr)
        return
    raise RunCheckError(f"{message}. To run it anyway pass --allow-mismatch ({risk})")


def _check_cluster(plan: Plan, launch: Launch) -> None:
    if len(plan.cluster.groups) == 1:  # one node type (a mixed cluster's launch is checked by its groups' order)
        dpn, nodes = plan.cluster.devices_per_node, plan.cluster.nodes
        if (nodes, dpn) != (launch.nodes, launch.procs_per_node):
            _mismatch(
                f"cluster: the plan is for {nodes} node(s) x {dpn} devices per node, but this launch has "
                f"{launch.nodes} node(s) x {launch.procs_per_node} processes per node; tensor-parallel ranks must "
                f"share a node as planned. Launch --nnodes {nodes} --nproc-per-node {dpn} (locally: --nproc "
                f"{nodes * dpn} for one node), or re-plan with --nodes {launch.nodes} --devices-per-node "
                f"{launch.procs_per_node}",
                "tensor-parallel groups may then cross nodes and the predicted step time no longer applies")


def check_fingerprint(plan: Plan, preset: ModelPreset) -> None:
    seq_len = plan.model.seq_len
    graph = trace_model(preset.build(device="meta"), preset.sample_input(1, seq_len), name=preset.name,
                        dtype=plan.model.dtype, seq_len=seq_len)
    if graph.fingerprint() != plan.model.fingerprint:
        _mismatch(
            f"model.fingerprint: the plan was made for a model with fingerprint {plan.model.fingerprint} "
            f"({plan.model.num_layers} layers) but preset {preset.name!r} now traces to {graph.fingerprint()} "
            f"({graph.num_layers} layers); the model changed since planning. Re-create the plan for this model "
            f"(python -m planner plan --model {preset.name} …)",
            "stages are cut at the plan's layer names, memory and time predictions were made for another model, "
            "and a stage may no longer fit")


def check_module_fingerprint(plan: Plan, model: torch.nn.Module, sample_input: Any) -> None:
    """A user's module against the plan made for it: trace it as the planner did and compare fingerprints.

    ``sample_input`` is what was given to ``planner.plan(..., sample_input=...)`` (batch 1 is enough). A
    mismatch names the first layer that differs (name, parameter count) from the plan's layer graph."""
    from planner.graph_io import graph_from_dict

    try:
        graph = trace_model(model, sample_input, name=plan.model.name, dtype=plan.model.dtype,
                            seq_len=plan.model.seq_len, copy_model=True)
    except PlannerError as exc:
        raise RunCheckError(f"model: {type(model).__name__} could not be traced as the planner traces it ({exc}); "
                            "pass parallelize(..., sample_input=) the sample input the plan was made with") from exc
    if graph.fingerprint() == plan.model.fingerprint:
        return
    what = f"{graph.num_layers} layers, {graph.param_count} parameters"
    if plan.graph:
        planned = [(layer.name, layer.param_count, layer.signature, layer.frozen_count)
                   for layer in graph_from_dict(plan.graph).layers]
        traced = [(layer.name, layer.param_count, layer.signature, layer.frozen_count) for layer in graph.layers]
        diffs = [(p, t) for p, t in zip(planned, traced) if p != t]
        if len(planned) != len(traced):
            what = (f"{len(traced)} layers where the plan has {len(planned)} (layers only in the plan: "
                    f"{sorted({n for n, *_ in planned} - {n for n, *_ in traced})[:5]}, only in the model: "
                    f"{sorted({n for n, *_ in traced} - {n for n, *_ in planned})[:5]})")
        elif diffs:
            (pname, pcount, _, pfrozen), (tname, tcount, _, tfrozen) = diffs[0]
            shape = ("same parameter count, other shapes or ops (or the plan was written by a planner version "
                     "that traced this model's ops differently)") if pcount == tcount else \
                f"{tcount} parameters where the plan has {pcount}"
            if pcount == tcount and pfrozen != tfrozen:  # frozen after planning, or unfrozen
                shape = (f"{tfrozen} of its parameters are frozen (requires_grad=False) where the plan has {pfrozen}: "
                         "freeze the model as it will train before planning it")
            what = f"layer {tname!r} differs from the plan's {pname!r}: {shape}"
            if len(diffs) > 1:
                what += f" (and {len(diffs) - 1} more layers differ)"
    _mismatch(
        f"model.fingerprint: the plan was made for a model {plan.model.name} with fingerprint "
        f"{plan.model.fingerprint} ({plan.model.num_layers} layers, {plan.model.param_count} parameters), but this "
        f"{type(model).__name__} traces to {graph.fingerprint()}: {what}. Re-create the plan for this model "
        "(planner.plan(model, cluster, global_batch=..., sample_input=...))",
        "stages are cut at the plan's layer names, memory and time predictions were made for another model, "
        "and a stage may no longer fit")


def plan_sample_input(plan: Plan, sample_input: Any = None) -> Any:
    """``sample_input``, else zeros of the one the plan records (``plan.model.sample_input``: a module's
    structure, shapes and dtypes), else the one the planner makes for a token model: ``[1, seq_len]`` ids."""
    if sample_input is not None:
        return sample_input
    if plan.model.sample_input is not None:
        from planner.errors import SpecError
        from planner.sample_spec import sample_from_spec

        try:
            return sample_from_spec(plan.model.sample_input)
        except (SpecError, KeyError, TypeError, ValueError) as exc:
            raise RunCheckError(f"model.sample_input: the plan's record of the sample input cannot be read ({exc}); "
                                "pass parallelize(..., sample_input=) the sample input the plan was made with, "
                                "or re-create the plan") from exc
    if plan.model.seq_len is None:
        raise RunCheckError("sample_input: the plan records no sample input and its model no sequence length to "
                            "make token ids from; pass parallelize(..., sample_input=) the sample input the plan "
                            "was made with, or re-create the plan with this planner (it records the sample)")
    return torch.zeros(1, plan.model.seq_len, dtype=torch.long)


def check_user_model(plan: Plan, model: torch.nn.Module, sample_input: Any) -> None:
    """A user's model against its plan, as a run and a dry run check it first: the planner's fingerprint
    (:func:`check_module_fingerprint`), then the layer names the stages are cut at."""
    check_module_fingerprint(plan, model, sample_input)
    check_layer_names(model, plan)


def check_layer_names(model: torch.nn.Module, plan: Plan) -> None:
    """Every layer the plan cuts stages at is a submodule of ``model``: what even ``--allow-mismatch`` needs,
    since the stages are built by those names."""
    if whole_model_plan(model, plan):
        return
    names = dict(model.named_modules())
    missing = [name for name in plan.model.layer_names if name not in names]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise RunCheckError(f"model: the plan's layers {missing[:5]}{more} are not submodules of this "
                            f"{type(model).__name__}, and stages are cut at those names; give the model the plan "
                            "was made for, or re-create the plan for this one")


def _check_tied(meta: torch.nn.Module, plan: Plan) -> None:
    pos = {s.index: s.ranks[0] for s in plan.stages}
    for tied in tied_parameters(meta, plan):
        stages = sorted(set(tied.stages))
        if len(stages) > 1 and len({pos[s] for s in stages}) < len(stages) and plan.parallel.zero_stage >= 3:
            raise RunCheckError(
                f"stages: the tied parameter {list(tied.names)} lies in stages {stages}, which the plan puts on the "
                "same ranks; there the stages share one parameter, which ZeRO-3 (FSDP2, one group of parameters "
                "per stage) cannot shard twice. Use zero_stage 0-2, a plan whose embedding and head stages sit on "
                "different pipeline positions, or an untied model")
