"""Shared fixtures for the runtime tests: one world per world size, run once per session.

The worlds are started with the runtime's own launcher (torch elastic, gloo on CPU); each trains
every plan of its size in turn (see ``runtime_harness.run_jobs``). The single-process oracle runs in a
one-process world too, so pytest's own process never computes (forked workers stay fork-safe).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# This folder is called runtime too: with only tests/ on sys.path (``pytest`` rather than ``python -m pytest``)
# ``import runtime`` would make a namespace package of tests/runtime + runtime/ and skip runtime/__init__.py.
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from runtime_harness import LR, STEPS, job_for, launch, run_jobs, run_reference  # noqa: E402,F401
from runtime_plans import WORLD2, WORLD4, make_plan, tiny_preset  # noqa: E402,F401


@pytest.fixture(scope="session")
def references() -> dict:
    """tied? -> (losses, grad norms) of the single-process oracle, gpt-tiny, global batch 8 in 4 micro-batches."""
    plan = make_plan(num_micro_batches=4)
    untied, tied = tiny_preset("gpt-tiny", None), tiny_preset("gpt-tiny", True)
    cases = [(False, plan, untied, LR), (True, make_plan(num_micro_batches=4, tie=True), tied, LR),
             ("frozen", plan, untied, 0.0)]  # lr 0: shows how far a plan that does not train would be off
    return launch(1, run_reference, cases, STEPS)[0]


@pytest.fixture(scope="session")
def world2_results():
    return launch(2, run_jobs, [job_for(n, s) for n, s in WORLD2.items()])[0]


@pytest.fixture(scope="session")
def world4_results():
    return launch(4, run_jobs, [job_for(n, s) for n, s in WORLD4.items()])[0]
