"""The splits Megatron-LM and nanotron make by their own rule (planner.inter_op.framework_splits),
checked against the rules worked by hand, and `evaluate --partition` pricing them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from planner.errors import SpecError
from planner.inter_op.framework_splits import megatron_split, nanotron_split

sys.path.insert(0, str(Path(__file__).parent))
import fixtures as F  # noqa: E402


def _sizes(bounds):
    return [b - a for a, b in bounds]


def test_megatron_gives_each_chunk_equal_blocks_embedding_first_head_last():
    g = F.imbalanced_lm(16)  # embed, 16 blocks, head
    assert megatron_split(g, 4) == ((0, 5), (5, 9), (9, 13), (13, 18))  # 4 blocks each; embed and head ride along
    assert _sizes(megatron_split(g, 8)) == [3, 2, 2, 2, 2, 2, 2, 3]
    # 16 blocks into 6 chunks: the first four take one more (3, 3, 3, 3, 2, 2)
    bounds = megatron_split(g, 6)
    assert [b - a - (a == 0) - (b == 18) for a, b in bounds] == [3, 3, 3, 3, 2, 2]
    # an encoder-decoder: both stacks are blocks, the layers between them stay with the block before
    ed = F.encoder_decoder(6, 6)
    assert megatron_split(ed, 4) == ((0, 4), (4, 7), (7, 10), (10, 14))
    with pytest.raises(SpecError, match="16 blocks to split into 32"):
        megatron_split(g, 32)


def test_nanotron_keeps_the_block_that_crosses_each_share():
    """The playbook's 1B (16 equal blocks, an LM head of four blocks' weight): pp 4 gives 6, 5, 5 blocks
    and the head alone, as nanotron's build_model assigns them; pp 2 gives 11, then 5 and the head."""
    blocks = [F._block(i, params=1_000_000) for i in range(16)]
    specs = [F.LayerSpec(name="embed", gflops=0.0, params=4_000_000, act_mib=1.0, out_mib=1.0, module_type="Embed"),
             *blocks,
             F.LayerSpec(name="head", gflops=10.0, params=0, act_mib=1.0, out_mib=1.0, module_type="LMHead",
                         tied=(("embed.weight", 4_000_000, 0),))]
    g = F.synthetic_graph("playbook-1b-shaped", specs)
    assert nanotron_split(g, 4) == ((0, 7), (7, 12), (12, 17), (17, 18))
    assert nanotron_split(g, 2) == ((0, 12), (12, 18))
    with pytest.raises(SpecError, match="leaves 1 of 8 pipeline ranks"):
        nanotron_split(g, 8)  # the head crosses two shares: nanotron's last rank would hold only the loss


def test_evaluate_prices_the_framework_split_and_says_so():
    from planner.api import evaluate
    from planner.plan import ParallelConfig

    cfg = ParallelConfig(dp=2, tp=1, pp=4, micro_batch_size=1, num_micro_batches=8)
    plans = {p: evaluate("gpt3-1.3b", "dgx-h100", cfg, nodes=1, partition=p)
             for p in ("balanced", "megatron", "nanotron")}
    assert [(s.layer_start, s.layer_stop) for s in plans["megatron"].stages] == [(0, 7), (7, 13), (13, 19), (19, 26)]
    assert [(s.layer_start, s.layer_stop) for s in plans["nanotron"].stages] == [(0, 8), (8, 15), (15, 21), (21, 26)]
    assert any("megatron's own split" in n for n in plans["megatron"].explanation)
    assert not any("not the planner's own split" in n for n in plans["balanced"].explanation)
    for p in ("megatron", "nanotron"):  # the planner's split runs no slower than a framework's
        assert plans["balanced"].predicted.step_time_s <= plans[p].predicted.step_time_s * (1 + 1e-9)
        assert plans[p].solver.status == "given" and plans[p].predicted.fits
    exact = evaluate("gpt3-1.3b", "dgx-h100", cfg, nodes=1, partition="exact")  # the solver's split alone
    assert [(s.layer_start, s.layer_stop) for s in exact.stages] == [(0, 7), (7, 13), (13, 20), (20, 26)]
    assert any("exact solver's split" in n for n in exact.explanation)
    busiest = {q: x.predicted.time_breakdown_s["compute"] for q, x in (("exact", exact), *plans.items())}
    assert all(busiest["exact"] <= b * (1 + 1e-9) for b in busiest.values())  # it minimises the busiest stage
    one_stage = evaluate("gpt3-1.3b", "dgx-h100", ParallelConfig(dp=8, tp=1, pp=1, micro_batch_size=1,
                                                                  num_micro_batches=2), nodes=1, partition="megatron")
    assert not any("own split" in n for n in one_stage.explanation)  # one stage: no split to name
    with pytest.raises(SpecError, match="partition"):
        evaluate("gpt3-1.3b", "dgx-h100", cfg, nodes=1, partition="deepspeed")


def test_plan_searches_with_a_framework_split_and_a_typo_is_an_error():
    """`plan --partition megatron` prices every configuration at Megatron-LM's split, so the plan's
    stages are that split of its chunk count; an unknown name is refused, never read as another."""
    from planner import cli
    from planner.api import plan
    from planner.inter_op.framework_splits import PARTITIONS
    from planner.resolve import resolve_model
    from planner.search import SearchSpace

    assert cli.PARTITIONS == PARTITIONS
    with pytest.raises(SpecError, match="partition"):
        SearchSpace(partition="balance")
    graph = resolve_model("gpt3-1.3b", dtype="bf16").graph
    for rule, split in (("megatron", megatron_split), ("nanotron", nanotron_split)):
        p = plan("gpt3-1.3b", "dgx-h100", nodes=1, global_batch=16, baselines=False,
                 space=SearchSpace(pp=(4,), partition=rule))
        chunks = p.parallel.pp * p.parallel.virtual_stages
        assert tuple((s.layer_start, s.layer_stop) for s in sorted(p.stages, key=lambda s: s.index)) == \
            split(graph, chunks)
        assert any("own split" in line for line in p.explanation)
    with pytest.raises(SpecError, match="leaves 1 of 2 pipeline ranks of gpt-tiny"):
        plan("gpt-tiny", "cpu-local", global_batch=8, baselines=False, space=SearchSpace(pp=(2,), partition="nanotron"))
