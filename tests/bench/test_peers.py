"""The peers section calls the real DeepSpeed and torchgpipe packages and writes runnable plans of their splits."""

from __future__ import annotations

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("torchgpipe")

from bench import peers  # noqa: E402


@pytest.fixture(scope="module")
def gpt_tiny():
    return peers._layers("gpt-tiny")


def test_deepspeed_methods_are_the_packages(gpt_tiny):
    from deepspeed.runtime.utils import partition_balanced

    names, model, _ = gpt_tiny
    assert names == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    two = {s.peer: s.sizes for s in peers.deepspeed_splits(model, names, 2)}
    four = {s.peer: s.sizes for s in peers.deepspeed_splits(model, names, 4)}
    assert two["DeepSpeed uniform"] == (3, 3)
    assert four["DeepSpeed uniform"] == (2, 2, 1, 1)  # the remainder on the first stages
    counts = [sum(p.numel() for p in model.get_submodule(n).parameters()) for n in names]
    parts = [int(x) for x in partition_balanced(counts, 4)]
    assert four["DeepSpeed parameters"] == tuple(b - a for a, b in zip(parts, parts[1:]))
    # type: balances the four GPTBlocks; the embedding and the head weigh nothing
    assert sum(four["DeepSpeed type:^GPTBlock$"]) == 6 and len(four["DeepSpeed type:^GPTBlock$"]) == 4


def test_torchgpipe_balance_by_time_runs_on_cpu_and_by_size_refuses(gpt_tiny):
    names, model, preset = gpt_tiny
    by = {s.peer: s for s in peers.torchgpipe_splits(model, names, preset, 2, 2)}
    t = by["torchgpipe balance_by_time"].sizes
    assert t is not None and len(t) == 2 and sum(t) == 6 and min(t) >= 1
    size = by["torchgpipe balance_by_size"]
    assert size.sizes is None and "size profiler supports only CUDA device" in size.note


def test_plans_of_peer_splits_have_those_stages():
    ours, plan_for = peers.ours_and_pricer("gpt-tiny", 2, 16)
    assert sum(ours.sizes) == 6 and len(ours.sizes) == 2
    plan = plan_for((3, 3))
    assert [(s.layer_start, s.layer_stop) for s in sorted(plan.stages, key=lambda s: s.index)] == [(0, 3), (3, 6)]
    assert plan.parallel.pp == 2 and plan.parallel.num_micro_batches == peers.MICRO_BATCHES
    assert plan.predicted.step_time_s > 0
