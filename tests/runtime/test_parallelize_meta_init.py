"""A model built on the meta device and initialised on each rank by ``parallelize``: copies of one weight
on different ranks start equal (found by trying the runtime as a user would).

* pp=2: the head tied to the embedding sits on the other stage's rank; each rank initialised its own
  copy, so the copies differed and stayed different (their gradients are summed, never their values).
* dp=2 without ZeRO (DDP): DDP checked the weights while they were still on meta and raised.
"""

from __future__ import annotations

import pytest
import torch
from meta_init_workers import SAMPLE, TiedLM, tied_copies
from runtime_harness import launch

from planner import ParallelConfig, evaluate


def _plan_text(cfg: ParallelConfig) -> str:
    with torch.device("meta"):
        model = TiedLM()
    return evaluate(model, "cpu-local", cfg, sample_input=SAMPLE, devices_per_node=2, dtype="fp32").to_json_text()


def test_meta_tied_copies_start_equal_under_a_pipeline_and_ddp_takes_meta_models():
    pp = launch(2, tied_copies, _plan_text(ParallelConfig(pp=2, micro_batch_size=1, num_micro_batches=2)))
    assert torch.equal(pp[0]["tied"], pp[1]["tied"])
    ddp = launch(2, tied_copies, _plan_text(ParallelConfig(dp=2, micro_batch_size=1, num_micro_batches=1)))
    assert torch.equal(ddp[0]["block0"], ddp[1]["block0"])  # DDP broadcast rank 0's initialised weights
    assert torch.equal(ddp[0]["tied"], ddp[1]["tied"])


def test_a_model_planned_as_one_layer_trains_as_one_process():
    """A flat MLP is planned as one layer named after its class (no stack to cut); parallelize runs it whole
    under data parallelism, its root's own parameter included, with the single process's losses."""
    from meta_init_workers import FlatMLP, flat_batches, flat_losses

    plan = evaluate(FlatMLP(), "cpu-local", ParallelConfig(dp=2, micro_batch_size=2, num_micro_batches=1),
                    sample_input=torch.zeros(1, 12), devices_per_node=2, dtype="fp32")
    assert plan.model.layer_names == ("FlatMLP",)
    torch.manual_seed(0)
    model = FlatMLP()
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    reference = []
    for x, y in flat_batches(3, 4):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        reference.append(loss.item())
    got = launch(2, flat_losses, plan.to_json_text(), 3)
    for rank in (0, 1):
        assert got[rank] == pytest.approx(reference, abs=1e-5)


def test_a_tied_model_saved_with_one_copy_resumes_with_two(tmp_path):
    """Saved under dp=2 (the tied weight is one parameter: its optimizer state under one name), resumed under
    pp=2 (a copy on each rank): the second copy's state is read from its twin's, and step 3's loss is the
    one a run that never stopped gets."""
    from meta_init_workers import tied_resume

    dp = _plan_text(ParallelConfig(dp=2, micro_batch_size=2, num_micro_batches=1))
    pp = _plan_text(ParallelConfig(pp=2, micro_batch_size=2, num_micro_batches=2))
    resumed = launch(2, tied_resume, dp, pp, str(tmp_path / "a"))
    straight = launch(2, tied_resume, dp, dp, str(tmp_path / "b"))
    assert resumed[0] == pytest.approx(straight[0], abs=1e-5)
    assert resumed[0][2] != pytest.approx(resumed[0][1], abs=1e-3)  # the steps train
