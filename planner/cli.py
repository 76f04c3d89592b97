"""python -m planner: search, price and explain parallel training plans.

Errors a user can cause print one paragraph naming the field and the fix and exit with code 2
(``--debug`` shows the traceback); every bad argument of one command line is reported at once,
one line per field. Nothing here decides anything: it parses, calls
:mod:`planner.api`, and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from planner.cost.constants import TRAINERS, trainer_constants
from planner.errors import (
    ArgumentCheck,
    SpecError,
    choice_arg,
    choices_metavar,
    float_arg,
    int_arg,
    run_command,
    subcommand_options,
)
from planner.units import format_count, plural

GiB = 2**30
DTYPES = ("bf16", "fp16", "fp32")
RECOMPUTE = ("none", "selective", "op", "full")
ZERO_STAGES = (0, 1, 2, 3)
PARTITIONS = ("balanced", "exact", "uniform", "megatron", "nanotron")  # the first is the default (planner.api.PARTITIONS)
DEFAULT_TRAINER = "megatron"


def _add_model_cluster(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("model and cluster")
    g.add_argument("--model", required=required,
                   help="model preset name, or a Hugging Face config.json (or its folder) on disk; "
                        "`python -m planner models` lists both kinds")
    g.add_argument("--cluster", required=required, help="cluster preset name or path to a cluster JSON file")
    g.add_argument("--nodes", type=int_arg, help="number of nodes (overrides the preset)")
    g.add_argument("--devices-per-node", type=int_arg, help="devices per node (for cpu-local: local processes)")
    g.add_argument("--i-know", action="store_true",
                   help="accept cluster figures outside the plausible ranges (exotic hardware) with a warning; "
                        "see docs/cluster.md")
    g.add_argument("--global-batch", type=int_arg, help="samples per optimizer step")
    g.add_argument("--seq-len", type=int_arg, help="sequence length (default: the preset's)")
    g.add_argument("--dtype", type=choice_arg(*DTYPES), metavar=choices_metavar(*DTYPES),
                   help="training dtype (default: bf16 where the devices support it, else fp32)")
    g.add_argument("--trainer", type=choice_arg(*sorted(TRAINERS)), metavar=choices_metavar(*sorted(TRAINERS)),
                   default=DEFAULT_TRAINER,
                   help="what runs the plan, for the cost model: megatron (fused kernels, bf16 weights with an fp32 "
                        "master copy; default), compiled (torch.compile), eager (unfused PyTorch), nanotron (eager around "
                        "fused kernels; its pipeline engine's floor under tp collectives across nodes), torch (this "
                        "project's runtime, torchtitan: eager, fp32 parameters under autocast)")
    g.add_argument("--constants", metavar="FILE",
                   help="JSON object of cost-model constants over the trainer's (fields of CostConstants; "
                        "`python -m bench.cpu_profile --constants-out` writes this machine's)")


def _add_config(p: argparse.ArgumentParser, *, required: bool) -> None:
    g = p.add_argument_group("configuration" if required else "constraints (fix a knob, search the rest)")
    g.add_argument("--tp", type=int_arg, help="tensor-parallel degree")
    g.add_argument("--pp", type=int_arg, help="pipeline-parallel degree")
    g.add_argument("--dp", type=int_arg, help="data-parallel degree")
    g.add_argument("--cp", type=int_arg, help="context-parallel degree (ranks splitting each sequence)")
    g.add_argument("--ep", type=int_arg, help="expert-parallel degree (data-parallel ranks splitting the experts)")
    g.add_argument("--micro-batch", type=int_arg, help="micro-batch size (samples per micro-batch)")
    g.add_argument("--virtual-stages", type=int_arg, help="model chunks per device (interleaved schedules)")
    g.add_argument("--schedule", help="pipeline schedule (gpipe, 1f1b, interleaved-1f1b, zb-h1, ...)")
    g.add_argument("--recompute", type=choice_arg(*RECOMPUTE), metavar=choices_metavar(*RECOMPUTE),
                   help="activation recomputation: none; selective (attention cores, Megatron); op (per-op: "
                        "every other matmul and the attention kernels saved, torchtitan); full (whole layers)")
    g.add_argument("--sequence-parallel", action="store_true", default=None, help="Megatron sequence parallelism")
    g.add_argument("--zero", type=choice_arg(*ZERO_STAGES), metavar=choices_metavar(*ZERO_STAGES),
                   help="ZeRO / FSDP stage")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="overlap DP gradient reduction with backward")
    g.add_argument("--dp-shard", type=int_arg, metavar="N",
                   help="HSDP: ZeRO-3 shards over groups of N data-parallel ranks, replicated across the groups")
    g.add_argument("--no-reshard-after-forward", action="store_true",
                   help="ZeRO-3 keeps the gathered weights from forward to backward (one all-gather per micro-batch)")
    g.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=None,
                   help="FP8 GEMMs in the linear layers (H100 and later); plan: --no-fp8 keeps bf16 GEMMs")
    g.add_argument("--recompute-every", type=int_arg, metavar="K",
                   help="full recomputation of one layer in every K (the others store their activations)")


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", help="write the plan JSON here")
    p.add_argument("--force", action="store_true", help="overwrite the output file if it exists")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables (docs/json-output.md)")


def _add_planning_commands(sub: Any) -> None:
    """``plan`` and ``evaluate``: a model and a cluster in, a plan out."""
    p = sub.add_parser("plan", help="search for the fastest configuration that fits")
    _add_model_cluster(p, required=False)  # missing ones are reported with the rest (check_arguments)
    _add_config(p, required=False)
    _add_output(p)
    p.add_argument("--time-limit", type=float_arg, help="seconds; returns the best plan found so far, labelled")
    p.add_argument("--top-k", type=int_arg, default=5, help="alternatives kept in the plan (default 5)")
    p.add_argument("--schedules", help="comma-separated schedules the search may use")
    p.add_argument("--partition", default=PARTITIONS[0], type=choice_arg(*PARTITIONS),
                   metavar=choices_metavar(*PARTITIONS),
                   help="stage boundaries of every configuration searched: the exact memory-aware DP's, improved by "
                        "local search on the simulated step (balanced), the DP's alone (exact), equal layers per "
                        "stage (uniform), or the split Megatron-LM (megatron) or nanotron (nanotron) makes by its "
                        "own rule, for a run in that framework")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="predict one hand-written configuration (no search)")
    _add_model_cluster(p, required=False)
    _add_config(p, required=True)
    _add_output(p)
    p.add_argument("--plan", help="re-evaluate the configuration and stages of this plan file")
    p.add_argument("--partition", default=PARTITIONS[0], type=choice_arg(*PARTITIONS),
                   metavar=choices_metavar(*PARTITIONS),
                   help="stage boundaries: the exact memory-aware DP's, improved by local search on the simulated "
                        "step (balanced), the DP's alone (exact), equal layers per stage (uniform), or the split "
                        "Megatron-LM (megatron) or nanotron (nanotron) makes by its own rule")


def _add_plan_file_commands(sub: Any) -> None:
    """``explain``, ``compare``, ``report`` and ``timeline``: read a plan file."""
    p = sub.add_parser("explain", help="why a plan is what it is; --what-if re-plans a changed cluster")
    p.add_argument("plan", help="plan JSON file")
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/json-output.md)")
    p.add_argument("--what-if", action="append", default=[], metavar="KNOB=VALUE",
                   help="re-plan with a change, without retracing: inter_node_bandwidth=2x, nodes=16, memory=0.5x, "
                        "intra_node_bandwidth=…, devices_per_node=…, peak_flops=…, global_batch=… (repeatable)")

    p = sub.add_parser("compare", help="the plan against the baselines (pure DP, ZeRO-3, Megatron-LM)")
    p.add_argument("plan", help="plan JSON file")
    p.add_argument("--json", action="store_true", help="print one JSON object (docs/json-output.md)")

    p = sub.add_parser("report", help="write a Markdown report with timeline and memory charts (--html: one "
                                      "interactive page)")
    p.add_argument("plan", help="plan JSON file")
    p.add_argument("-o", "--output", required=True, help="output folder (with --html: the .html file)")
    p.add_argument("--force", action="store_true", help="write into an existing folder (overwrite the .html file)")
    p.add_argument("--html", action="store_true",
                   help="one self-contained interactive HTML file: timeline with zoom and hover, memory per device, "
                        "sortable baselines and alternatives, what-if re-plans")
    p.add_argument("--what-if", action="append", default=None, metavar="KNOB=VALUE",
                   help="with --html: a re-plan to show (repeatable; default nodes=2x and inter_node_bandwidth=2x)")

    p = sub.add_parser("timeline", help="draw the pipeline timeline of a plan (PNG, PDF or SVG)")
    p.add_argument("plan", help="plan JSON file")
    p.add_argument("-o", "--output", required=True,
                   help="image to write: .png, .pdf or .svg (no suffix: .png is added)")
    p.add_argument("--force", action="store_true", help="overwrite the image if it exists")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m planner", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_planning_commands(sub)
    _add_plan_file_commands(sub)
    sub.add_parser("models", help="list model presets")
    p = sub.add_parser("clusters", help="list cluster presets")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="each preset's device (peaks, memory, bandwidth) and links, as `plan` echoes them")
    p = sub.add_parser("profile-cluster", help="measure collectives, GEMMs and memory here; write a cluster JSON")
    p.add_argument("-o", "--output", required=True, help="cluster JSON to write (then: plan --cluster FILE)")
    p.add_argument("--base", help="preset or cluster file for the device and links (default: cpu-local on the CPU, "
                                  "the DGX preset of the GPU)")
    p.add_argument("--nproc", type=int_arg, help="local processes to measure (default: the GPUs, else 2)")
    p.add_argument("--max-bytes", type=int_arg, help="largest message (default 64 MiB on the CPU, 1 GiB on GPUs)")
    p.add_argument("--iterations", type=int_arg, help="timed samples per point (default 5)")
    p.add_argument("--force", action="store_true", help="overwrite the output file")
    from planner.validation.command import add_arguments as _validate_arguments

    _validate_arguments(sub.add_parser("validate", help="the cost model's predictions against measured runs"))
    from planner.export.command import add_arguments as _export_arguments

    _export_arguments(sub.add_parser("export", help="write a plan as Megatron-LM / torchtitan / DeepSpeed / nanotron "
                                                    "configuration; says what each cannot express"))
    return parser


def _show_warning(message: Any, category: type, *rest: Any, _default: Any = None, **kw: Any) -> None:
    """A cluster-plausibility warning reads as one line on stderr, like an error; others as Python's."""
    from planner.plausible import PlausibilityWarning

    if issubclass(category, PlausibilityWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _default(message, category, *rest, **kw)


def _cluster_arg(args: argparse.Namespace) -> tuple[Any, int | None, int | None]:
    """(cluster, nodes, devices per node) for plan()/evaluate(): the name as given, or with --i-know
    the cluster read here, resized, with implausible figures accepted (a warning each)."""
    if not getattr(args, "i_know", False):
        return args.cluster, args.nodes, args.devices_per_node
    from planner.resolve import resolve_cluster

    return resolve_cluster(args.cluster, nodes=args.nodes, devices_per_node=args.devices_per_node,
                           strict=False), None, None


def main(argv: list[str] | None = None) -> int:
    import functools
    import warnings

    warnings.showwarning = functools.partial(_show_warning, _default=warnings.showwarning)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    return run_command(lambda: _dispatch(args, unknown, parser), debug=args.debug)


def _dispatch(args: argparse.Namespace, unknown: list[str] | None = None,
              parser: argparse.ArgumentParser | None = None) -> int:
    check_arguments(args, unknown or [], options=subcommand_options(parser, args.command) if parser else ())
    return {"plan": _cmd_plan, "evaluate": _cmd_evaluate, "explain": _cmd_explain, "timeline": _cmd_timeline,
            "compare": _cmd_compare, "report": _cmd_report, "models": _cmd_models,
            "clusters": _cmd_clusters, "profile-cluster": _cmd_profile_cluster, "validate": _cmd_validate,
            "export": _cmd_export}[args.command](args)


def _cmd_validate(args: argparse.Namespace) -> int:
    from planner.validation.command import run

    return run(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from planner.export.command import run

    return run(args)


_POSITIVE = ("nodes", "devices_per_node", "global_batch", "seq_len", "tp", "pp", "dp", "cp", "ep", "micro_batch", "dp_shard", "recompute_every",
             "virtual_stages", "top_k", "nproc", "max_bytes", "iterations")


def check_arguments(args: argparse.Namespace, unknown: list[str], *, options: Any = ()) -> None:
    """Every problem of the command line at once (one :class:`SpecError` per field), before any work.

    What needs the model or the cluster (degrees against the device count, pp against the layers)
    is checked after they are read, by :func:`planner.resolve.check_config`, also all at once.
    """
    check = ArgumentCheck(args, unknown, command=args.command, options=list(options))
    check.at_least(1, *(d for d in _POSITIVE if hasattr(args, d)))
    check.at_least(0, "time_limit", integer=False)
    if args.command == "plan":
        check.require("model", "cluster", "global_batch")
        for s in args.schedules.split(",") if args.schedules else ([args.schedule] if args.schedule else []):
            _check_schedule(check, "--schedules" if args.schedules else "--schedule", s.strip())
        _check_sharding(check)
    elif args.command == "evaluate" and not args.plan:
        check.require("model", "cluster", "tp", "pp", "dp", "micro_batch", "global_batch")
        _check_config(check)
    elif args.command == "evaluate":
        _check_plan_alone(check)
    if args.command in ("plan", "evaluate"):
        _check_output(check)
        if check.errors:  # name a wrong model or cluster in the same answer (both read in milliseconds)
            _check_model_cluster(check)
    check.raise_if_any()


# What `evaluate --plan` takes from the plan file: giving one of these as well would be silently dropped.
_FROM_PLAN = ("model", "cluster", "nodes", "devices_per_node", "global_batch", "seq_len", "dtype", "constants", "tp",
              "pp", "dp", "cp", "ep", "micro_batch", "virtual_stages", "schedule", "recompute", "sequence_parallel",
              "zero", "dp_shard", "fp8", "recompute_every")


def _check_plan_alone(check: ArgumentCheck) -> None:
    """`evaluate --plan` re-prices the plan's own model, cluster, configuration and constants: a flag
    that would change one of them is an error, not ignored."""
    args = check.args
    given = [n for n in _FROM_PLAN if getattr(args, n, None) is not None]
    given += [n for n in ("i_know", "overlap_grad_reduce", "no_reshard_after_forward") if getattr(args, n, False)]
    given += [n for n, default in (("trainer", DEFAULT_TRAINER), ("partition", PARTITIONS[0]))
              if getattr(args, n) != default]
    for name in given:
        check.add("--" + name.replace("_", "-"), getattr(args, name),
                  "evaluate --plan re-prices the plan file's own model, cluster, configuration and constants; drop "
                  "it, or evaluate the changed configuration with --model, --cluster and the configuration flags")


def _check_schedule(check: ArgumentCheck, field: str, name: str) -> None:
    from planner import schedules

    try:
        schedules.get_schedule(name)
    except SpecError as exc:
        check.add(field, name, exc.fix)


def _check_config(check: ArgumentCheck) -> None:
    """The knobs of `evaluate` against each other: batch divisibility, sp needs tp, v needs pp."""
    gb, dp, mb = check.value("global_batch"), check.value("dp"), check.value("micro_batch")
    if None not in (gb, dp, mb) and gb % (dp * mb):
        check.add("--global-batch", gb, f"must be a multiple of dp x micro-batch = {dp * mb} (dp {dp}, "
                  f"micro-batch {mb})")
    if check.value("tp") == 1 and check.args.sequence_parallel:
        check.add("--sequence-parallel", True, "sequence parallelism needs tp > 1; drop --sequence-parallel or "
                  "raise --tp")
    v = check.value("virtual_stages")
    if check.value("pp") == 1 and v is not None and v > 1:
        check.add("--virtual-stages", v, "virtual stages need pp > 1; drop --virtual-stages or raise --pp")
    if check.args.schedule:
        _check_schedule(check, "--schedule", check.args.schedule)
    _check_sharding(check)


def _check_sharding(check: ArgumentCheck) -> None:
    """--dp-shard and --no-reshard-after-forward need ZeRO-3 (and --dp-shard to divide --dp); --recompute-every
    above 1 needs full recomputation."""
    args, zero = check.args, check.value("zero")
    if zero is None and args.command == "evaluate":
        zero = 0  # evaluate's default
    shard, dp = check.value("dp_shard"), check.value("dp")
    if shard is not None and zero is not None and zero != 3:
        check.add("--dp-shard", shard, "HSDP shards parameters (ZeRO-3 / FSDP): add --zero 3, or drop --dp-shard")
    if shard is not None and dp is not None and dp % shard:
        check.add("--dp-shard", shard, f"the shard group size must divide --dp {dp}")
    if args.no_reshard_after_forward and zero is not None and zero != 3:
        check.add("--no-reshard-after-forward", True, "only ZeRO-3 reshards parameters: add --zero 3, or drop it")
    every = check.value("recompute_every")
    if every is not None and every > 1 and check.value("recompute") not in (None, "full"):
        check.add("--recompute-every", every, "one layer in K is full recomputation: use --recompute full")


def _check_output(check: ArgumentCheck) -> None:
    from planner.output_paths import check_output_file

    if check.args.output:
        check.attempt(check_output_file, "--output", check.args.output, force=check.args.force)


def _check_model_cluster(check: ArgumentCheck) -> None:
    from planner.errors import PlannerError
    from planner.models import load_preset
    from planner.resolve import resolve_cluster

    if check.value("model") is not None:
        try:
            from planner.models import hf_config

            hf_config.load_config(check.args.model) if hf_config.is_config_path(check.args.model) \
                else load_preset(check.args.model)
        except PlannerError as exc:
            check.errors.append(exc if isinstance(exc, SpecError) else SpecError("--model", check.args.model,
                                                                               str(exc)))
    if check.value("cluster") is not None:
        try:
            resolve_cluster(check.args.cluster, nodes=check.value("nodes"),
                            devices_per_node=check.value("devices_per_node"), strict=not check.args.i_know)
        except PlannerError as exc:
            check.errors.append(exc if isinstance(exc, SpecError) else SpecError("--cluster", check.args.cluster,
                                                                               str(exc)))


def _cmd_plan(args: argparse.Namespace) -> int:
    from planner.api import plan
    from planner.search import SearchSpace

    fields: dict[str, Any] = dict(
        tp=(args.tp,) if args.tp else None, pp=(args.pp,) if args.pp else None, dp=(args.dp,) if args.dp else None,
        micro_batch_size=(args.micro_batch,) if args.micro_batch else None,
        schedules=tuple(s.strip() for s in args.schedules.split(",")) if args.schedules else (
            (args.schedule,) if args.schedule else None),
        virtual_stages=(args.virtual_stages,) if args.virtual_stages else None,
        recompute=(args.recompute,) if args.recompute else RECOMPUTE,
        sequence_parallel=(args.sequence_parallel,) if args.sequence_parallel is not None else (False, True),
        zero_stage=(args.zero,) if args.zero is not None else (0, 1, 2, 3),
        overlap_grad_reduce=args.overlap_grad_reduce,
        cp=(args.cp,) if args.cp else None,
        ep=(args.ep,) if args.ep else None,
        partition=args.partition,
    )
    space = SearchSpace(**(fields | _sharding_space(args)))  # a sharding flag narrows zero_stage / recompute
    cluster, nodes, devices_per_node = _cluster_arg(args)
    progress = None if (args.no_progress or args.json) else ProgressBar()
    try:
        result = plan(args.model, cluster, global_batch=args.global_batch, seq_len=args.seq_len,
                      nodes=nodes, devices_per_node=devices_per_node, space=space, dtype=args.dtype,
                      time_limit_s=args.time_limit, top_k=args.top_k, progress=progress,
                      constants=_constants(args))
    finally:
        if progress:
            progress.close()
    return _emit(result, args)


def _sharding_space(args: argparse.Namespace) -> dict[str, Any]:
    """The HSDP, reshard, FP8 and recompute-every constraints of `plan` (``SearchSpace`` fields). HSDP and
    keeping the gathered weights are ZeRO-3, one layer in K is full recomputation: asking for one fixes that."""
    out: dict[str, Any] = {}
    if args.dp_shard:
        out["dp_shard"] = (args.dp_shard,)
    if args.no_reshard_after_forward:
        out["reshard_after_forward"] = (False,)
    if (args.dp_shard or args.no_reshard_after_forward) and args.zero is None:
        out["zero_stage"] = (3,)
    if args.fp8 is not None:
        out["fp8"] = (args.fp8,)
    if args.recompute_every:
        out["recompute_every"] = (args.recompute_every,)
        if args.recompute is None and args.recompute_every > 1:
            out["recompute"] = ("full",)
    return out


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from planner.api import evaluate
    from planner.plan import ParallelConfig, Plan

    if args.plan:
        old = Plan.from_json(args.plan, verify=False)  # re-prices a plan edited by hand, on purpose
        cfg = old.parallel
        model = old.model.preset or _stored_model(old)
        if model is None:
            raise SpecError("--plan", args.plan, "this plan file has no preset and no stored cost graph (written by "
                            "an older planner); re-evaluate it with planner.evaluate(module, ...) or re-create it")
        from planner.cost.constants import CostConstants

        cluster = old.cluster
        known = {f for f in CostConstants.__dataclass_fields__}  # the plan's own constants (older files: fewer)
        constants = CostConstants(**{k: v for k, v in old.cost_constants.items() if k in known})
        result = evaluate(model, cluster, cfg, seq_len=old.model.seq_len, dtype=old.model.dtype, constants=constants,
                          stages=[(s.layer_start, s.layer_stop) for s in old.stages])  # as the file has them
        return _emit(_kept_placements(result, old), args)
    per_replica = args.global_batch // (args.dp * args.micro_batch)  # check_arguments: divides exactly
    cfg = ParallelConfig(dp=args.dp, tp=args.tp, pp=args.pp, micro_batch_size=args.micro_batch,
                         num_micro_batches=per_replica, virtual_stages=args.virtual_stages or 1,
                         schedule=args.schedule or "1f1b", recompute=args.recompute or "none",
                         sequence_parallel=bool(args.sequence_parallel), zero_stage=args.zero or 0,
                         overlap_grad_reduce=args.overlap_grad_reduce, cp=args.cp or 1, ep=args.ep or 1,
                         dp_shard=args.dp_shard, reshard_after_forward=not args.no_reshard_after_forward,
                         fp8=bool(args.fp8), recompute_every=args.recompute_every or 1)
    cluster, nodes, devices_per_node = _cluster_arg(args)
    result = evaluate(args.model, cluster, cfg, seq_len=args.seq_len, nodes=nodes,
                      devices_per_node=devices_per_node, dtype=args.dtype, partition=args.partition,
                      constants=_constants(args))
    return _emit(result, args)


def _kept_placements(result: Any, old: Any) -> Any:
    """``result`` with the plan file's tensor-parallel placements where re-pricing its stored graph (no op
    graph to solve again) found none: a module of one's own has no other split for the runtime to run."""
    from dataclasses import replace

    if result.parallel.tp == 1 or result.placements.style or not old.placements.style:
        return result
    note = ("tensor-parallel placements kept from the plan file (its intra-op solve); the stored graph has no op "
            "graph to solve again, so tp communication is priced by the Megatron count")
    return replace(result, placements=old.placements, explanation=(*result.explanation, note))


def _stored_model(plan: Any) -> Any:
    """A plan's model as its stored cost graph (a Hugging Face config or a Python module: no preset to
    rebuild), or None when the file has none."""
    from planner.graph_io import graph_from_dict
    from planner.resolve import ResolvedModel

    return ResolvedModel(module=None, preset=None, graph=graph_from_dict(plan.graph),
                         sample_spec=plan.model.sample_input) if plan.graph else None


def _constants(args: argparse.Namespace) -> Any:
    """The trainer's cost constants, with the fields of ``--constants FILE`` over them."""
    from planner.cost.constants import constants_from_file

    base = trainer_constants(args.trainer)
    return constants_from_file(args.constants, base) if args.constants else base


def summary_dict(plan: Any) -> dict[str, Any]:
    cfg, pred = plan.parallel, plan.predicted
    return {
        "model": plan.model.name, "cluster": plan.cluster.name, "devices": cfg.world_size,
        "step_time_s": pred.step_time_s, "mfu": pred.mfu, "peak_memory_bytes": pred.peak_memory_bytes,
        "fits": pred.fits, "tp": cfg.tp, "pp": cfg.pp, "dp": cfg.dp, "micro_batch": cfg.micro_batch_size,
        "num_micro_batches": cfg.num_micro_batches, "global_batch": cfg.global_batch, "schedule": cfg.schedule,
        "virtual_stages": cfg.virtual_stages, "recompute": cfg.recompute, "sequence_parallel": cfg.sequence_parallel,
        "zero_stage": cfg.zero_stage, "throughput_samples_per_s": pred.throughput_samples_per_s,
        "time_breakdown_s": pred.time_breakdown_s, "memory_breakdown_bytes": pred.memory_breakdown_bytes,
        "stages": [[s.layer_start, s.layer_stop] for s in plan.stages],
        "solver": {"status": plan.solver.status, "gap": plan.solver.gap},
        "uncertainty": pred.uncertainty,
    }


def _emit(plan: Any, args: argparse.Namespace) -> int:
    written = None
    if args.output:
        written = plan.to_json(args.output, force=args.force)
    if args.json:
        out = summary_dict(plan)
        out["plan_file"] = str(written) if written else None
        out["timings_s"] = dict(plan.timings)
        print(json.dumps(out, indent=2))
    else:
        print_plan(plan)
        if written:
            print(f"\nplan written to {written}")
    return 0 if plan.predicted.fits else 3


_BINDING_MEANING = {  # planner.cost.model._binding's values
    "compute": "the busiest device, bound by computation",
    "communication": "the busiest device, over 30% of its step in exposed communication",
    "memory": "within 10% of the usable memory",
    "memory (over the limit)": "over the usable memory: does not fit",
    "none (waits on the bottleneck stage)": "not the busiest device",
}
_ZERO_MEANING = {"1": "optimizer state sharded over dp", "2": "optimizer state and gradients sharded over dp",
                 "3": "weights, gradients and optimizer state sharded over dp (FSDP)"}


def _sharding_legend(tokens: list[str]) -> list[str]:
    """The legend of the HSDP, no-reshard, FP8 and recompute-every labels (``ParallelConfig.label``)."""
    parts = []
    if any(t.startswith("hsdp=") for t in tokens):
        parts.append("hsdp=RxS = ZeRO-3 sharded over groups of S data-parallel ranks, R replicas of each (HSDP)")
    if "no-reshard" in tokens:
        parts.append("no-reshard = ZeRO-3 keeps the gathered weights from forward to backward")
    if "fp8" in tokens:
        parts.append("fp8 = FP8 GEMMs in the linear layers (torchao float8)")
    for t in dict.fromkeys(t for t in tokens if t.startswith("recompute=full/")):
        k = t.removeprefix("recompute=full/")
        parts.append(f"{t} = one layer in every {k} recomputed in full, the others store their activations")
    return parts


def legend(labels: Any, bindings: Any = ()) -> str:
    """One line explaining the labels used in ``labels`` (``ParallelConfig.label()`` strings) and the
    ``binding`` values shown, and nothing else."""
    from planner import schedules

    tokens = [t for label in labels for t in label.replace(",", " ").split()]
    parts: list[str] = []
    if any(t.startswith(("dp=", "tp=", "pp=")) for t in tokens):
        parts.append("dp/tp/pp = data-, tensor-, pipeline-parallel degrees")
    mbs = sorted({t for t in tokens if t.startswith("mb=")})
    if len(mbs) == 1:
        size, count = mbs[0].removeprefix("mb=").split("x")
        parts.append(f"{mbs[0]} = {plural(int(count), 'micro-batch', 'micro-batches')} of "
                     f"{plural(int(size), 'sample')} per data-parallel replica per step")
    elif mbs:
        parts.append("mb=SxN = N micro-batches of S samples per data-parallel replica per step")
    for name in dict.fromkeys(t for t in tokens if t in schedules.SCHEDULE_NAMES):
        parts.append(f"{name} = {schedules.get_schedule(name).title} schedule")
    if any(t.startswith("v=") for t in tokens):
        parts.append("v = model chunks per device")
    for t in dict.fromkeys(t for t in tokens if t.startswith("recompute=") and "/" not in t):  # /k: _sharding_legend
        parts.append({"recompute=selective": "recompute=selective = the attention core recomputed in the backward",
                      "recompute=op": "recompute=op = per-op checkpointing: every other matmul's and the attention "
                                      "kernels' outputs kept, the rest recomputed in the backward (torchtitan)",
                      "recompute=full": "recompute=full = each layer's forward recomputed in the backward"}.get(t, t))
    if "sp" in tokens:
        parts.append("sp = sequence parallelism (norms and dropout split along the sequence over tp)")
    for t in sorted({t for t in tokens if t.startswith("zero") and t[4:] in _ZERO_MEANING}):
        parts.append(f"{t} = {_ZERO_MEANING[t[4:]]}")
    parts.extend(_sharding_legend(tokens))
    shown = [b for b in dict.fromkeys(bindings) if b in _BINDING_MEANING]
    if shown:
        parts.append("binding (what limits a device): " + "; ".join(f"{b} = {_BINDING_MEANING[b]}" for b in shown))
    return "legend: " + "; ".join(parts)


def print_plan(plan: Any, *, more_labels: Any = ()) -> None:
    """The plan as tables, ending with a legend of its labels (and of ``more_labels``, printed after it)."""
    import shutil

    from rich.console import Console
    from rich.table import Table

    from planner.uncertainty import summary_line

    console = Console(width=max(shutil.get_terminal_size((130, 40)).columns, 130))
    cfg, pred = plan.parallel, plan.predicted
    fit = "[green]fits[/green]" if pred.fits else "[red]DOES NOT FIT[/red]"
    console.print(f"[bold]{plan.model.name}[/bold] on {plan.cluster.name} ({plural(cfg.world_size, 'device')}), "
                  f"global batch {cfg.global_batch}")
    console.print(f"  {cfg.label()}")
    for i, line in enumerate(plan.cluster.echo()):  # the cluster as read, in human units
        console.print(f"  {'cluster as read: ' if i == 0 else ' ' * 17}{line.strip()}", highlight=False)
    console.print(f"  predicted step {pred.step_time_s:.4g} s, MFU {pred.mfu:.1%}, "
                  f"{pred.throughput_samples_per_s:.4g} samples/s, peak memory "
                  f"{pred.peak_memory_bytes / GiB:.2f} GiB ({fit})")
    band = summary_line(pred.uncertainty)
    if band:
        console.print(f"  {band}", highlight=False)
    t = Table(title="step time (busiest device)", show_header=True)
    t.add_column("part")
    t.add_column("seconds", justify="right")
    t.add_column("share", justify="right")
    total = pred.step_time_s or 1.0
    for k, v in pred.time_breakdown_s.items():
        if v > 0:
            t.add_row(k, f"{v:.4g}", f"{v / total:.1%}")
    console.print(t)
    m = Table(title="memory per device, by pipeline position (GiB)")
    for col in ("stage", "layers", "weights", "grads", "optimizer", "activations", "temp", "total", "binding"):
        m.add_column(col, justify="right" if col not in ("layers", "binding") else "left")
    shown = plan.stages if len(plan.stages) <= 16 else plan.stages[:8] + plan.stages[-8:]
    bindings = []
    for s in shown:
        st = pred.stages[s.device_index] if s.device_index < len(pred.stages) else {}
        mem = st.get("memory_bytes", {})
        names = s.layer_names
        label = names[0] if len(names) == 1 else f"{names[0]} … {names[-1]} ({len(names)})"
        bindings.append(st.get("binding", ""))
        m.add_row(str(s.index), label, *(f"{mem.get(k, 0) / GiB:.2f}" for k in
                                         ("weights", "gradients", "optimizer", "activations", "temporary", "total")),
                  st.get("binding", ""))
    console.print(m)
    timing = ""
    if plan.timings:
        timing = ", planned in " + ", ".join(f"{k.removesuffix('_s')} {v:.2f} s" for k, v in plan.timings.items())
    console.print(f"  solver: {plan.solver.method}, status {plan.solver.status}, gap {plan.solver.gap:.2%}{timing}")
    console.print(f"  {legend([cfg.label(), *more_labels], bindings)}", highlight=False, soft_wrap=True)


def _cmd_explain(args: argparse.Namespace) -> int:
    from planner.plan import Plan

    plan = Plan.from_json(args.plan)
    if args.what_if:
        return _what_if(plan, args)
    if args.json:
        print(json.dumps({"summary": summary_dict(plan), "explanation": list(plan.explanation),
                          "alternatives": [a.to_dict() for a in plan.search.alternatives]}, indent=2))
        return 0
    alts = plan.search.alternatives
    print_plan(plan, more_labels=[a["config"] for a in alts])
    print("\nwhy:")
    for line in plan.explanation:
        print(f"  - {line}")
    if alts:
        print("\nalternatives (next best under the same cost model):")
        for a in alts:
            ratio = a["step_time_s"] / plan.predicted.step_time_s
            print(f"  - {a['config']}: step {a['step_time_s']:.4g} s ({ratio:.3f}x), MFU {a['mfu']:.1%}")
    return 0


def _what_if(plan: Any, args: argparse.Namespace) -> int:
    from planner import whatif

    changes = [whatif.parse(text) for text in args.what_if]
    new = whatif.replan(plan, changes, baselines=False)
    old, cur = plan.predicted, new.predicted
    rows = [("configuration", plan.parallel.label(), new.parallel.label()),
            ("devices", str(plan.parallel.world_size), str(new.parallel.world_size)),
            ("global batch", str(plan.parallel.global_batch), str(new.parallel.global_batch)),
            ("step time (s)", f"{old.step_time_s:.4g}", f"{cur.step_time_s:.4g}"),
            ("throughput (samples/s)", f"{old.throughput_samples_per_s:.4g}", f"{cur.throughput_samples_per_s:.4g}"),
            ("MFU", f"{old.mfu:.1%}", f"{cur.mfu:.1%}"),
            ("peak memory (GiB)", f"{old.peak_memory_bytes / GiB:.2f}", f"{cur.peak_memory_bytes / GiB:.2f}")]
    if args.json:
        print(json.dumps({"what_if": args.what_if, "before": summary_dict(plan), "after": summary_dict(new)},
                         indent=2))
        return 0
    print(f"what if {', '.join(args.what_if)} (re-planned from the stored cost graph, no retracing):")
    width = max(len(r[0]) for r in rows)
    print(f"  {'':{width}}  {'now':>40}  {'what-if':>40}")
    for name, a, b in rows:
        print(f"  {name:{width}}  {a:>40}  {b:>40}")
    ratio = cur.throughput_samples_per_s / old.throughput_samples_per_s if old.throughput_samples_per_s else 0.0
    print(f"  throughput changes by {ratio:.3f}x")
    print(f"  {legend([plan.parallel.label(), new.parallel.label()])}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from planner.plan import Plan

    plan = Plan.from_json(args.plan)
    rows = plan.search.baselines or ()
    if args.json:
        print(json.dumps({"plan": summary_dict(plan), "baselines": [b.to_dict() for b in rows]}, indent=2))
        return 0
    if not rows:
        print("this plan records no baselines (made by `evaluate`, or with baselines off); "
              "re-create it with `python -m planner plan`")
        return 0
    print(f"{plan.model.name} on {plan.cluster.name} ({plural(plan.parallel.world_size, 'device')}), "
          f"global batch {plan.parallel.global_batch}, same cost model and graph:")
    print(f"  {'recipe':13s} {'step (s)':>10s} {'MFU':>7s} {'plan faster by':>15s}  configuration")
    print(f"  {'this plan':13s} {plan.predicted.step_time_s:10.4g} {plan.predicted.mfu:7.1%} {'':>15s}  "
          f"{plan.parallel.label()}")
    for b in rows:
        if b.get("step_time_s"):
            print(f"  {b['name']:13s} {b['step_time_s']:10.4g} {b['mfu']:7.1%} {b['speedup_of_plan']:14.3f}x  "
                  f"{b['config']}")
        else:
            print(f"  {b['name']:13s} {'—':>10s} {'—':>7s} {'—':>15s}  cannot run: {b.get('reason', '')}")
    print(f"  {legend([plan.parallel.label(), *(b['config'] for b in rows if b.get('config'))])}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from planner.errors import SpecError
    from planner.output_paths import check_output_file, check_output_folder
    from planner.plan import Plan
    from planner.report import write_report

    if args.html and Path(args.output).is_dir():
        raise SpecError("--output", args.output, "with --html, -o is the .html file to write, not a folder")
    if args.what_if and not args.html:
        raise SpecError("--what-if", args.what_if[0], "only the --html report shows what-if re-plans; add --html, "
                        "or use `explain PLAN --what-if ...`")
    out = (check_output_file if args.html else check_output_folder)("--output", args.output, force=args.force)
    plan = Plan.from_json(args.plan)
    if args.html:
        from planner.report_html import DEFAULT_WHAT_IFS, write_html_report

        written = write_html_report(plan, out, what_ifs=args.what_if or DEFAULT_WHAT_IFS)
        print(f"interactive report written to {written} (one self-contained file; open it in a browser)")
        return 0
    index = write_report(plan, out)
    print(f"report written to {index} (timeline.png, memory.png, baselines.png)")
    return 0


def _cmd_timeline(args: argparse.Namespace) -> int:
    from planner.output_paths import check_output_file
    from planner.plan import Plan
    from planner.report import TIMELINE_FORMATS, timeline

    out = check_output_file("--output", args.output, force=args.force, suffixes=TIMELINE_FORMATS)
    plan = Plan.from_json(args.plan)
    cfg = plan.parallel
    result = timeline(plan, out)
    print(f"timeline written to {out} ({cfg.schedule}, p={cfg.pp}, m={cfg.num_micro_batches}, "
          f"bubble {result.bubble_fraction:.1%})")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from planner.models import list_presets, load_preset

    for name in list_presets():
        preset = load_preset(name)
        print(f"{name:20s} {preset.family:11s} {format_count(preset.param_count()):>6s}  {preset.description[:70]}")
    from planner.models.hf_config import TRACED_FAMILIES

    print("\nHugging Face families known to trace (--model path/to/config.json; docs/huggingface.md):")
    for model_type, what in TRACED_FAMILIES.items():
        print(f"  {model_type:18s} {what}")
    return 0


def _cmd_clusters(args: argparse.Namespace) -> int:
    from planner.cluster import ClusterSpec

    for name in ClusterSpec.presets():
        spec = ClusterSpec.preset(name)
        print(spec.summary())
        for line in spec.echo() if getattr(args, "verbose", False) else ():
            print(f"  {line}")
    return 0


def _cmd_profile_cluster(args: argparse.Namespace) -> int:
    """Measure in a subprocess (``python -m runtime profile-cluster``: the planner never imports
    torch.distributed), then load what it wrote with the planner's own loader."""
    import subprocess

    from planner.cluster import ClusterSpec
    from planner.output_paths import check_output_file

    check_output_file("--output", args.output, force=args.force)  # here, before the subprocess imports torch
    cmd = [sys.executable, "-m", "runtime", "profile-cluster", "-o", args.output]
    for flag, value in (("--base", args.base), ("--nproc", args.nproc), ("--max-bytes", args.max_bytes),
                        ("--iterations", args.iterations)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += ["--force"] if args.force else []
    code = subprocess.run(cmd, check=False).returncode
    if code:
        return code
    print(f"{ClusterSpec.from_json(args.output).summary()}; plan with: python -m planner plan --model MODEL "
          f"--cluster {args.output}")
    return 0


class ProgressBar:
    """A rich progress bar that appears only when the search runs longer than a second."""

    def __init__(self) -> None:
        import time

        self._start = time.perf_counter()
        self._bar = None
        self._task = None

    def __call__(self, done: int, total: int) -> None:
        import time

        if self._bar is None:
            if time.perf_counter() - self._start < 1.0 or done >= total:
                return
            from rich.progress import Progress

            self._bar = Progress(transient=True)
            self._bar.start()
            self._task = self._bar.add_task("searching (tp, pp, dp)", total=total)
        self._bar.update(self._task, completed=done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


if __name__ == "__main__":
    sys.exit(main())
