"""Test-only fault injection: one rank of a real run dies or hangs in the middle of a step.

The training loop carries no fault code. A test that wants a fault starts the run with
``env=fault_env("kill:1:3")``: ``RUNTIME_FAULT`` says what (``kill:RANK:STEP``: that rank SIGKILLs itself
in step ``STEP``; ``hang:RANK:STEP``: it stops communicating there and sleeps until it is killed), and
``PYTHONPATH`` puts ``tests/runtime/fault_site/`` first. Its ``sitecustomize.py`` is imported by every
Python process of that run at start-up (the CLI, torch elastic's fork server and workers, or processes
started the torchrun way) and calls :func:`install`, which wraps the step function the training loop
calls (``runtime.train.forward_backward``) so that the chosen rank arms a forward pre-hook on its first
stage in the chosen step. The hook fires at the second micro-batch, when the peers are mid-step and
waiting on this rank. The runtime passes ``RUNTIME_*`` variables to its workers as they were at launch.
"""

from __future__ import annotations

import importlib
import os
import signal
import time
from pathlib import Path

FAULT_ENV = "RUNTIME_FAULT"
SITE_DIR = Path(__file__).parent / "fault_site"


def fault_env(spec: str) -> dict[str, str]:
    """The environment additions that make a run started with them inject fault ``spec``."""
    parse(spec)
    path = os.pathsep.join(p for p in (str(SITE_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {FAULT_ENV: spec, "PYTHONPATH": path}


def parse(spec: str) -> tuple[str, int, int]:
    """``"kill:1:3"`` -> ``("kill", 1, 3)``: kind, rank, step."""
    kind, rank, step = spec.split(":")
    if kind not in ("kill", "hang"):
        raise ValueError(f"{FAULT_ENV}: got {spec!r}; use kill:RANK:STEP or hang:RANK:STEP")
    return kind, int(rank), int(step)


def install() -> None:
    """Wrap ``runtime.train.forward_backward`` so that the fault in ``RUNTIME_FAULT`` fires; no-op without it."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, rank, step = parse(spec)
    import torch.distributed as dist

    train = importlib.import_module("runtime.train")  # the module: ``runtime.train`` the attribute is the function
    step_fn = train.forward_backward
    calls = {"steps": 0}

    def forward_backward(r, plan, *args, **kwargs):
        calls["steps"] += 1  # the loop calls this once per step, steps 1, 2, ... of a run that is not resumed
        if calls["steps"] == step and dist.get_rank() == rank:
            _arm(r.stages[0], plan.parallel.num_micro_batches, kind)
        return step_fn(r, plan, *args, **kwargs)

    train.forward_backward = forward_backward


def _arm(stage, num_micro_batches: int, kind: str) -> None:
    forwards = {"n": 0}

    def hook(module, args):
        forwards["n"] += 1
        if forwards["n"] == min(2, num_micro_batches):  # second micro-batch: peers are mid-step, waiting on us
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:
                time.sleep(60)

    stage.register_forward_pre_hook(hook)
