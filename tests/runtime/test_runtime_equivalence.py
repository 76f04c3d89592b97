"""Every plan trains exactly what one process trains: same losses (<= 1e-5) and gradient norms.

Each plan of ``WORLD2`` / ``WORLD4`` (conftest) runs 5 AdamW steps of gpt-tiny in fp32 on gloo with
real ranks; the oracle is a plain single-process PyTorch loop on the same seed and data. Losses alone
would not catch a gradient off by a constant factor (Adam divides it out), so the global gradient
norm before each update is compared too.
"""

from __future__ import annotations

import pytest
from runtime_harness import STEPS
from runtime_plans import WORLD2, WORLD4

LOSS_TOL = 1e-5
NORM_RTOL = 1e-4

pytestmark = pytest.mark.multiprocess


def _check(result, reference) -> None:
    ref_losses, ref_norms = reference
    assert result.error is None
    assert len(result.losses) == STEPS
    diff = max(abs(a - b) for a, b in zip(result.losses, ref_losses))
    assert diff <= LOSS_TOL, f"losses {result.losses} vs single process {ref_losses}"
    rel = max(abs(a / b - 1) for a, b in zip(result.grad_norms, ref_norms))
    assert rel <= NORM_RTOL, f"grad norms {result.grad_norms} vs single process {ref_norms}"


@pytest.mark.parametrize("name", list(WORLD2))
def test_two_ranks_match_single_process(name, world2_results, references):
    _check(world2_results[name], references[WORLD2[name].get("tie", False) is True])


@pytest.mark.parametrize("name", list(WORLD4))
def test_four_ranks_match_single_process(name, world4_results, references):
    _check(world4_results[name], references[WORLD4[name].get("tie", False) is True])


def test_the_comparison_can_fail(references):
    """A run that did not train (lr 0) is far outside the tolerance by step 2: the checks have teeth."""
    trained, frozen = references[False][0], references["frozen"][0]
    assert trained[0] == pytest.approx(frozen[0], abs=1e-7)  # same weights before the first update
    assert max(abs(a - b) for a, b in zip(trained[1:], frozen[1:])) > 100 * LOSS_TOL
