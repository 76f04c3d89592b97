"""Start the processes of a run, or join the ones ``torchrun`` started.

``run_local`` checks the plan once (:func:`runtime.checks.preflight`) and then starts ``nproc``
workers on this machine through torch elastic (what ``torchrun`` uses), with a c10d rendezvous on
a free port of 127.0.0.1 and no restarts: if a worker dies, the agent stops the others and the run
fails with the dead rank named. ``run_worker`` is what every worker runs, also when the processes
come from a user's ``torchrun … -m runtime run plan.json`` (``WORLD_SIZE``/``RANK`` are set, so the
CLI does not launch again): join the process group (gloo on CPU, NCCL with CUDA, with a timeout so a
lost peer ends the run instead of hanging it), train, and on rank 0 write and print the report.

A run ends cleanly, and never twice. A launcher that is killed, even by SIGKILL, leaves no worker
training or writing checkpoints as an orphan: every worker watches the launcher's process (a thread
blocked on a Linux pidfd, which becomes readable the moment the launcher exits) and SIGKILLs itself
then (:func:`watch_launcher`). The parent-death signal alone (``PR_SET_PDEATHSIG``, also armed, see
:func:`die_with_parent`: it covers workers whose parent is torchrun's agent) is not enough here: on the
CPU the workers' parent is the fork server, and that lives on until its last client exits, the
workers included. SIGTERM to the launcher reaches the workers
through torch elastic's shutdown; they stop after the step in progress (saving a checkpoint when
``--checkpoint-dir`` is set, see :class:`runtime.train.StopRequest`), rank 0 prints one line, and the
run exits with code 143.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import select
import signal
import sys
import threading
import traceback
import uuid
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from runtime.checks import Launch, check_fingerprint, load_plan, preflight
from runtime.errors import RunCheckError
from runtime.report import write_report
from runtime.train import EXIT_STOPPED, RunOptions, RunResult, train

EXIT_CHECK = 2  # a check failed: the message says what and how to fix it
EXIT_FAILED = 1  # a worker crashed, was killed, or timed out
_LOST_PEER = ("Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out", "Socket Timeout")


@dataclass(frozen=True, kw_only=True)
class WorkerArgs:
    plan_path: str
    options: RunOptions
    out: str | None = None
    debug: bool = False
    checked: bool = False  # preflight already ran in the launcher
    user: Any = None  # runtime.user_model.UserCode: --model/--data/--loss, else the plan's preset


def in_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_launch(nproc: int) -> Launch:
    return Launch(world_size=nproc, procs_per_node=nproc, nodes=1,
                  device_type="cuda" if torch.cuda.is_available() else "cpu")


def torchrun_launch() -> Launch:
    world = int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    return Launch(world_size=world, procs_per_node=local, nodes=max(1, world // max(local, 1)),
                  device_type="cuda" if torch.cuda.is_available() else "cpu")


def run_local(args: WorkerArgs, nproc: int) -> dict[int, Any]:
    """Check, then start ``nproc`` workers; returns rank -> return value. Raises :class:`RunCheckError`."""
    plan = load_plan(args.plan_path)
    resume_dir = args.options.checkpoint_dir if args.options.resume else None
    if args.user is not None and args.user.model:  # parallelize() checks the model itself, in the workers
        from runtime.user_model import preflight_user

        preflight_user(plan, local_launch(nproc), resume_dir=resume_dir, checkpoint_dir=args.options.checkpoint_dir)
    else:
        preflight(plan, local_launch(nproc), resume_dir=resume_dir)
    return launch_workers(nproc, run_worker, replace(args, checked=True), debug=args.debug,
                          shutdown_timeout_s=args.options.timeout_s)


def default_start_method() -> str:
    """``forkserver`` on the CPU, ``spawn`` with CUDA (which cannot be used in a forked child);
    ``RUNTIME_START_METHOD`` overrides.

    Not plain ``fork``: the launcher's process runs threads (the rendezvous store, the agent's
    monitor), and a child forked while one of them holds a lock can hang before it joins; now and
    then one did in the 4-rank test worlds (``DistStoreError: wait timeout`` on its key). The
    fork server is a clean single-threaded process that has imported torch once (see
    :func:`_preload_fork_server`), so workers still start in about a second.
    """
    method = os.environ.get("RUNTIME_START_METHOD") or ("spawn" if torch.cuda.is_available() else "forkserver")
    if method not in START_METHODS:
        raise RunCheckError(f"RUNTIME_START_METHOD: got {method!r}; use one of {', '.join(START_METHODS)}, or unset it")
    return method


START_METHODS = ("forkserver", "spawn", "fork")


_OWN_ENV_PREFIX = "RUNTIME_"  # RUNTIME_FAULT, RUNTIME_ALLOW_MISMATCH, ...: read by the workers


def _with_own_env(env: dict[str, str], fn, *args: Any) -> Any:
    """Worker side: the launcher's ``RUNTIME_*`` variables as they were at launch, then ``fn(*args)``.

    A fork server's children inherit its environment from when it started, not the launcher's now.
    """
    die_with_parent()
    if _LAUNCHER_PID_ENV in env:
        watch_launcher(int(env[_LAUNCHER_PID_ENV]))
    for key in [k for k in os.environ if k.startswith(_OWN_ENV_PREFIX) and k not in env]:
        del os.environ[key]
    os.environ.update(env)
    return fn(*args)


_PRELOAD = ["torch", "torch.distributed", "runtime.train", "planner.models"]


_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LAUNCHER_PID_ENV = "RUNTIME_LAUNCHER_PID"  # set by launch_workers for its workers


def watch_launcher(pid: int) -> bool:
    """SIGKILL this process as soon as process ``pid`` (the launcher) exits; returns whether it watches.

    A daemon thread blocks on a pidfd of the launcher (Linux 5.3+), which becomes readable when the launcher
    exits, even while it is an unreaped zombie. SIGKILL, not SIGTERM: an orphan must not save a checkpoint."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already gone
        os.kill(os.getpid(), signal.SIGKILL)
    except (AttributeError, OSError):  # not Linux, or an old kernel: the parent-death signal only
        return False

    def wait_then_die() -> None:
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=wait_then_die, name="runtime-launcher-watch", daemon=True).start()
    return True


def die_with_parent() -> bool:
    """Have the kernel SIGKILL this process when its parent exits (Linux ``prctl(PR_SET_PDEATHSIG)``).

    A worker's parent is the fork server (CPU) or the launcher (``spawn``); the fork server exits when the
    launcher does. SIGKILL, not SIGTERM: an orphan must not save a checkpoint on its way out. Returns
    whether it is armed (``False`` off Linux). If the parent is already gone (we were re-parented before
    arming), exit now."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if parent == 1 or os.getppid() != parent:
        os._exit(EXIT_FAILED)
    return True


def _preload_fork_server() -> None:
    """Have the fork server import torch and the runtime before it forks any worker (once per process)."""
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)


def launch_workers(nproc: int, fn, *fn_args: Any, start_method: str | None = None,
                   debug: bool = False, shutdown_timeout_s: float | None = None) -> dict[int, Any]:
    """Run ``fn(*fn_args)`` on ``nproc`` local workers via torch elastic; rank -> return value.

    A worker that fails makes the agent stop the others at once (no restarts) and this raises
    :class:`WorkersFailed` naming each failed rank and how it ended. When the launcher itself is stopped
    (SIGTERM, SIGINT) the agent forwards the signal and SIGKILLs a worker still alive
    ``shutdown_timeout_s`` later: a run's ``--timeout-s``, the time it allows any wait, so that a stopped
    worker can finish its step and save its checkpoint (torch elastic's 30 s when None). After a worker
    failure the agent stops the others with its own fixed 30 s.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    method = start_method or default_start_method()
    if method == "forkserver":
        _preload_fork_server()
    # Port 0: the agent's store binds a free port itself (torchrun --standalone does the same); a port
    # probed here first could be taken by another launch before the store binds it.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"runtime-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                          monitor_interval=0.1, start_method=method, local_addr="127.0.0.1",
                          shutdown_timeout=None if shutdown_timeout_s is None else max(1, math.ceil(shutdown_timeout_s)))
    if not debug:  # the agent logs each failure with its traceback; we print one line per failure instead
        for name in ("torch.distributed.elastic", "torch.multiprocessing"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        for name in list(logging.root.manager.loggerDict):  # modules that set their own level (the agent's
            if name.startswith("torch.distributed.elastic."):  # "Received 15 death signal" warning)
                logging.getLogger(name).setLevel(logging.CRITICAL)
    ours = {k: v for k, v in os.environ.items() if k.startswith(_OWN_ENV_PREFIX)}
    ours[_LAUNCHER_PID_ENV] = str(os.getpid())
    try:
        return elastic_launch(config, _with_own_env)(ours, fn, *fn_args)
    except ChildFailedError as exc:
        raise WorkersFailed(_describe_failures(exc)) from None
    except SignalException as exc:  # the launcher got SIGTERM/SIGINT: the agent has stopped the workers
        raise WorkersFailed(("", EXIT_STOPPED if exc.sigval == signal.SIGTERM else 128 + int(exc.sigval))) from None


class WorkersFailed(Exception):
    def __init__(self, summary: tuple[str, int]) -> None:
        self.exit_code = summary[1]
        super().__init__(summary[0])


def _describe_failures(exc) -> tuple[str, int]:
    lines, codes = [], []
    for rank, failure in sorted(exc.failures.items()):
        code = failure.exitcode
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            lines.append(f"rank {rank} (pid {failure.pid}) was killed by {sig}")
        else:
            lines.append(f"rank {rank} (pid {failure.pid}) exited with code {code}{_raised(failure)}")
        codes.append(code)
    if codes and all(c == EXIT_STOPPED for c in codes):  # stopped by a signal: rank 0 printed the one line
        return "", EXIT_STOPPED
    exit_code = EXIT_CHECK if codes and all(c == EXIT_CHECK for c in codes) else EXIT_FAILED
    return ("run failed: " + "; ".join(lines) + ". The launcher stopped the remaining ranks (no restarts).",
            exit_code)


def _raised(failure) -> str:
    """``: <the exception>`` when the worker died of one the launcher recorded (not a deliberate exit)."""
    message = failure.message.get("message", "") if isinstance(failure.message, dict) else ""
    first = message.strip().splitlines()[0] if message.strip() else ""
    if not first or first.startswith("SystemExit") or first.startswith("Process failed"):
        return ""
    return f" ({first[:300]})"


def run_worker(args: WorkerArgs) -> RunResult | None:
    """One rank: join, check (under torchrun), train, report. Exits the process on error."""
    rank = int(os.environ.get("RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ and _LAUNCHER_PID_ENV not in os.environ:
        die_with_parent()  # started by torchrun's agent (from its main thread): end with it
    try:
        return _worker(args)
    except RunCheckError as exc:
        _print_error(rank, str(exc), args.debug)
        sys.exit(EXIT_CHECK)
    except Exception as exc:
        text = _short(exc)
        if any(marker in text for marker in _LOST_PEER):
            text = ("lost contact with another rank (its process died, or it hung past --timeout-s); its log says "
                    f"why. Underlying error: {text}")
        _print_error(rank, f"{type(exc).__name__}: {text}", args.debug)
        sys.exit(EXIT_FAILED)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _worker(args: WorkerArgs) -> RunResult:
    plan = load_plan(args.plan_path)
    launch = torchrun_launch()
    if args.user is not None and args.user.model and not args.checked:  # parallelize() checks the model
        from runtime.user_model import preflight_user

        preflight_user(plan, launch, resume_dir=args.options.checkpoint_dir if args.options.resume else None,
                       checkpoint_dir=args.options.checkpoint_dir)
        args = replace(args, checked=True)
    if not args.checked:
        preset = preflight(plan, launch, fingerprint=False,
                           resume_dir=args.options.checkpoint_dir if args.options.resume else None)
    if launch.device_type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // launch.procs_per_node))
    init_distributed(args.options.timeout_s)
    if not args.checked:  # one trace for the whole job: rank 0 checks the fingerprint, every rank gets the verdict
        verdict: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                check_fingerprint(plan, preset)
            except RunCheckError as exc:
                verdict[0] = str(exc)
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise RunCheckError(verdict[0] if dist.get_rank() == 0 else "rank 0 found: " + verdict[0])
    if args.user is not None:
        from runtime.user_model import train_user

        result = train_user(plan, args.options, args.user)
    else:
        result = train(plan, args.options)
    stopped = result.stopped_by is not None
    if dist.get_rank() == 0 and (args.out or not stopped):  # stopped: the one line train() printed is enough
        write_report(plan, args.plan_path, args.options, result, launch, out=args.out,
                     verbose=args.options.verbose and not stopped)
    if stopped:
        dist.destroy_process_group()
        sys.exit(EXIT_STOPPED)
    return result


def join_process_group(caller: str, how: str, timeout_s: float) -> None:
    """Join the process group torchrun's environment describes, unless this process is in one already;
    outside both, a RunCheckError saying that ``caller`` runs on every rank and ``how`` to start them."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        raise RunCheckError(f"{caller} runs on every rank of a process group: {how}, or call "
                            "torch.distributed.init_process_group first")
    init_distributed(timeout_s)


def init_distributed(timeout_s: float) -> None:
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def _print_error(rank: int, message: str, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    print(f"error (rank {rank}): {message}", file=sys.stderr, flush=True)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return (first[:400] + " (run with --debug for the traceback)") if first else "(run with --debug for details)"

