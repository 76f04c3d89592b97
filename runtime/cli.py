"""``python -m runtime run plan.json --nproc N --steps K …``: train a plan on local processes.

Launched by ``torchrun`` (``WORLD_SIZE`` and ``RANK`` set), the same command joins the existing
processes instead of starting new ones. A failed check prints one paragraph naming the mismatch and
the fix and exits with code 2; a crashed or killed worker exits with code 1. ``--debug`` adds the
traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from planner.errors import run_command
from runtime.errors import RunCheckError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train a plan for a few steps on synthetic data and report the numbers")
    run.add_argument("plan", help="plan JSON written by `python -m planner plan` or `evaluate -o`")
    run.add_argument("--nproc", type=int, default=None,
                     help="local processes to start (default: the plan's dp*tp*pp); ignored under torchrun")
    run.add_argument("--steps", type=int, default=5, help="optimizer steps to run (default 5)")
    run.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic data (default 0)")
    run.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    run.add_argument("--out", default=None, help="write the metrics JSON here")
    run.add_argument("--checkpoint-dir", default=None, help="folder for checkpoints (step-NNNNNN/ inside)")
    run.add_argument("--checkpoint-every", type=int, default=0, help="save every N steps (0: never)")
    run.add_argument("--resume", action="store_true", help="resume from the newest checkpoint in --checkpoint-dir")
    run.add_argument("--timeout-s", type=float, default=120.0,
                     help="collective timeout: a rank waiting this long on a lost peer fails (default 120)")
    run.add_argument("--allow-mismatch", action="store_true",
                     help="run a plan whose model fingerprint or node layout does not match, with a warning "
                          "saying why that is risky (the schema version must still match)")
    run.add_argument("--verify-replicas", action="store_true",
                     help="after the last step, print how far the tensor-parallel copies of each replicated "
                          "parameter drifted apart (0 when consistent; a collective over every tp group)")
    run.add_argument("--quiet", action="store_true", help="print only errors")
    run.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _run(args), debug=args.debug, user_errors=RunCheckError)


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
    worker = WorkerArgs(plan_path=args.plan, options=options, out=args.out, debug=args.debug)
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
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0
