"""``python -m runtime run plan.json --nproc N --steps K …``: train a plan on local processes.

``run`` trains the plan's preset on synthetic data by default; ``--model pkg.module:factory`` trains the
user's own model instead (through :func:`runtime.parallelize.parallelize`), with ``--data`` and ``--loss``
for its batches and loss (:mod:`runtime.user_model`). ``dry-run plan.json`` builds every rank of the plan
on the meta device and prints the bytes each would hold next to the plan's prediction
(:mod:`runtime.dry_run`).

Launched by ``torchrun`` (``WORLD_SIZE`` and ``RANK`` set), the same command joins the existing
processes instead of starting new ones. A failed check prints one paragraph naming the mismatch and
the fix and exits with code 2; a crashed or killed worker exits with code 1. ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from planner.errors import ArgumentCheck, SpecError, float_arg, int_arg, run_command, subcommand_options
from runtime.errors import RunCheckError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a plan for a few steps on synthetic data and report the numbers")
    run.add_argument("plan", help="plan JSON written by `python -m planner plan` or `evaluate -o`")
    run.add_argument("--nproc", type=int_arg, default=None,
                     help="local processes to start (default: the plan's dp*tp*pp); ignored under torchrun")
    run.add_argument("--steps", type=int_arg, default=5, help="optimizer steps to run (default 5)")
    run.add_argument("--seed", type=int_arg, default=0, help="seed of the weights and the synthetic data (default 0)")
    run.add_argument("--lr", type=float_arg, default=1e-3, help="AdamW learning rate (default 1e-3)")
    run.add_argument("--out", default=None, help="write the metrics JSON here")
    run.add_argument("--force", action="store_true",
                     help="overwrite an existing --out file; save into a --checkpoint-dir that holds files")
    run.add_argument("--checkpoint-dir", default=None, help="folder for checkpoints (step-NNNNNN/ inside)")
    run.add_argument("--checkpoint-every", type=int_arg, default=0, help="save every N steps (0: never)")
    run.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --checkpoint-dir")
    run.add_argument("--timeout-s", type=float_arg, default=120.0,
                     help="collective timeout: a rank waiting this long on a lost peer fails (default 120)")
    run.add_argument("--allow-mismatch", action="store_true",
                     help="run a plan whose model fingerprint or node layout does not match, with a warning "
                          "saying why that is risky (the schema version must still match)")
    run.add_argument("--verify-replicas", action="store_true",
                     help="after the last step, print how far the tensor-parallel copies of each replicated "
                          "parameter drifted apart (0 when consistent; a collective over every tp group)")
    run.add_argument("--model", default=None, metavar="PKG.MODULE:FACTORY",
                     help="train your own model: FACTORY() returns the nn.Module the plan was made for (real "
                          "weights, or on the meta device); default: the plan's preset")
    run.add_argument("--data", default=None, metavar="PKG.MODULE:LOADER",
                     help="LOADER(rank=, world=, ...) yields this data-parallel rank's (inputs, targets) per step; "
                          "default: the preset's synthetic data")
    run.add_argument("--loss", default=None, metavar="PKG.MODULE:FN",
                     help="FN(output, targets) -> the mean loss of one micro-batch; default: the preset's loss, "
                          "else cross-entropy over the last dim of the output (or its .logits)")
    run.add_argument("--quiet", action="store_true", help="print only errors")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    dry = sub.add_parser("dry-run", help="build every rank of a plan on the meta device (a fake process group, no "
                                         "memory) and print the bytes each would hold next to the plan's prediction")
    dry.add_argument("plan", help="plan JSON written by `python -m planner plan`")
    dry.add_argument("--rank", type=int_arg, default=None,
                     help="build this rank alone (default: every rank, one per group of identical roles)")
    dry.add_argument("--model", default=None, metavar="PKG.MODULE:FACTORY",
                     help="the model to build (called under torch.device('meta')); default: the plan's preset")
    dry.add_argument("--allow-mismatch", action="store_true",
                     help="build a --model whose fingerprint does not match the plan's, with a warning")
    dry.add_argument("--json", action="store_true", help="print the report as one JSON object (docs/json-output.md)")
    dry.add_argument("--debug", action="store_true", help="show tracebacks")
    prof = sub.add_parser("profile-cluster", help="measure collectives, GEMMs and memory here and write a cluster "
                                                  "JSON (runtime/profile_cluster.py, docs/cluster.md)")
    prof.add_argument("-o", "--output", required=True, help="cluster JSON to write")
    prof.add_argument("--base", help="preset or cluster file for the device and links (default: cpu-local on the "
                                     "CPU, the DGX preset of the GPU)")
    prof.add_argument("--nproc", type=int_arg, help="local processes (default: the GPUs, else 2); ignored under torchrun")
    prof.add_argument("--min-bytes", type=int_arg, default=4096, help="smallest message (default 4096)")
    prof.add_argument("--max-bytes", type=int_arg, help="largest message (default 64 MiB on the CPU, 1 GiB on GPUs)")
    prof.add_argument("--iterations", type=int_arg, default=5, help="timed samples per point (default 5)")
    prof.add_argument("--timeout-s", type=float_arg, default=120.0, help="collective timeout (default 120)")
    prof.add_argument("--force", action="store_true", help="overwrite the output file")
    prof.add_argument("--quiet", action="store_true", help="print only errors")
    prof.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    body = {"profile-cluster": _profile, "dry-run": _dry_run, "run": _run}[args.command]

    def checked() -> int:
        check_arguments(args, unknown, options=subcommand_options(parser, args.command))
        return body(args)

    return run_command(checked, debug=args.debug, user_errors=(RunCheckError, SpecError))


def check_arguments(args: argparse.Namespace, unknown: list[str], *, options: list[str]) -> None:
    """Every bad argument at once, one line per field (:class:`planner.errors.ArgumentCheck`)."""
    check = ArgumentCheck(args, unknown, command=args.command, options=options)
    check.at_least(1, *(d for d in ("nproc", "min_bytes", "max_bytes", "iterations") if hasattr(args, d)))
    check.at_least(0, *(d for d in ("steps", "checkpoint_every", "rank") if hasattr(args, d)))
    check.at_least(0, *(d for d in ("lr", "timeout_s") if hasattr(args, d)), integer=False)
    if args.command == "run" and not args.checkpoint_dir:
        if check.value("checkpoint_every"):
            check.add("--checkpoint-every", args.checkpoint_every, "needs --checkpoint-dir (where to save)")
        if args.resume:
            check.add("--resume", True, "needs --checkpoint-dir (the folder to resume from)")
    if args.command == "run":
        _check_run_outputs(check)
    if args.command == "profile-cluster":
        lo, hi = check.value("min_bytes"), check.value("max_bytes")
        if lo is not None and hi is not None and hi < lo:
            check.add("--max-bytes", hi, f"below --min-bytes {lo}; raise --max-bytes or lower --min-bytes")
    check.raise_if_any()


def _check_run_outputs(check: ArgumentCheck) -> None:
    """``--out`` and ``--checkpoint-dir`` before any worker starts: a wrong path must not cost a run."""
    from pathlib import Path

    from planner.output_paths import check_output_file, check_output_folder

    args = check.args
    if args.out:
        out = check.attempt(check_output_file, "--out", args.out, force=args.force)
        if out is not None and Path(args.plan).exists() and out.resolve() == Path(args.plan).resolve():
            check.add("--out", args.out, "that is the plan file being run; write the metrics elsewhere")
    if args.checkpoint_dir:
        check.attempt(check_output_folder, "--checkpoint-dir", args.checkpoint_dir, force=args.force or args.resume,
                      exists_fix="the folder holds files (an earlier run's checkpoints?); pass --resume to continue "
                                 "from its newest checkpoint, --force to save into it anyway, or choose another folder")


def _profile(args: argparse.Namespace) -> int:
    from runtime.profile_cluster import ProfileOptions, run

    options = ProfileOptions(output=args.output, base=args.base, min_bytes=args.min_bytes, max_bytes=args.max_bytes,
                             iterations=args.iterations, timeout_s=args.timeout_s, force=args.force,
                             verbose=not args.quiet)
    return run(options, args.nproc)


def _dry_run(args: argparse.Namespace) -> int:
    import json

    from runtime.checks import load_plan
    from runtime.dry_run import dry_run, format_report

    if args.allow_mismatch:  # read by runtime.checks
        from runtime.checks import ALLOW_MISMATCH_ENV

        os.environ[ALLOW_MISMATCH_ENV] = "1"
    build = None
    if args.model:
        from runtime.user_model import meta_factory

        build = meta_factory(args.model)
    report = dry_run(load_plan(args.plan), rank=args.rank, build_model=build)
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.allow_mismatch:  # read by runtime.checks in this process and in the spawned workers
        from runtime.checks import ALLOW_MISMATCH_ENV

        os.environ[ALLOW_MISMATCH_ENV] = "1"
    from runtime.launch import WorkerArgs, WorkersFailed, in_torchrun, run_local, run_worker
    from runtime.train import RunOptions

    try:
        options = RunOptions(steps=args.steps, seed=args.seed, lr=args.lr, checkpoint_dir=args.checkpoint_dir,
                             checkpoint_every=args.checkpoint_every, resume=args.resume, timeout_s=args.timeout_s,
                             verbose=not args.quiet, verify_replicas=args.verify_replicas)
    except ValueError as exc:
        raise RunCheckError(str(exc)) from exc
    user = None
    if args.model or args.data or args.loss:
        from runtime.user_model import UserCode

        user = UserCode(model=args.model, data=args.data, loss=args.loss)
        if not in_torchrun():  # in the launcher: a typo, a factory that raises, a bad batch fail before any start
            from runtime.checks import load_plan

            user.preflight(load_plan(args.plan), seed=args.seed)
    worker = WorkerArgs(plan_path=args.plan, options=options, out=args.out, debug=args.debug, user=user)
    if in_torchrun():
        run_worker(worker)
        return 0
    nproc = args.nproc
    if nproc is None:
        from runtime.checks import load_plan

        nproc = load_plan(args.plan).parallel.world_size
    try:
        run_local(worker, nproc)
    except WorkersFailed as exc:
        if str(exc):  # empty when a signal stopped the run: rank 0 printed the one line already
            print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
