"""The runtime trains the Llama, BERT and ViT families exactly as one process does, tp=2 included.

Multi-process part (marked ``multiprocess``): ``llama-tiny`` (grouped-query attention, SwiGLU),
``bert-tiny`` (post-norm, tied MLM decoder) and ``vit-tiny`` run tp=2, pp=2, dp=2 and pp=2 x tp=2,
and the planner's own tp=2 plan for llama-tiny (its intra-op solver's styles) runs too: 5 AdamW steps
in fp32 on gloo, losses within 1e-5 of a plain single-process loop and gradient norms within 1e-4 relative.
At tp=2 every rank must hold exactly half of each attention projection (q, k, v, o) and feed-forward
matrix, which the runtime's own count of weight + gradient + AdamW bytes shows. The rest are
single-process checks of the pairs, head splits and refusals of :mod:`runtime.tensor_parallel_generic`.

Run as a script, it prints the equivalence table of docs/runtime.md ("Llama, BERT, ViT")::

    .venv/bin/python tests/runtime/test_runtime_blocks_tp.py
"""

from __future__ import annotations

import functools

import pytest
from runtime_harness import (
    EQUIVALENCE_HEADER,
    LR,
    STEPS,
    Job,
    check_untrained_is_caught,
    equivalence_row,
    launch,
    preset_references,
    run_jobs,
)
from runtime_harness import check_matches as _check
from runtime_plans import make_plan, tiny_preset
from torch.distributed.tensor.parallel import ColwiseParallel

from planner.models import ModelPreset
from planner.models.blocks import FeedForward
from planner.plan import Plan
from runtime.errors import RunCheckError
from runtime.tensor_parallel import check_tensor_parallel
from runtime.tensor_parallel_generic import generic_styles, linear_pairs

PRESETS = ("llama-tiny", "bert-tiny", "vit-tiny")
ATTENTION = ("attn.q", "attn.k", "attn.v", "attn.o")
FFN = {"llama-tiny": ("ffn.gate", "ffn.up", "ffn.down"), "bert-tiny": ("ffn.up", "ffn.down"),
       "vit-tiny": ("mlp.up", "mlp.down")}


@functools.cache
def planner_plan() -> Plan:
    """The planner's own plan for llama-tiny at tp=2 (``planner.api.evaluate``: its intra-op solver writes the styles)."""
    from planner.api import evaluate
    from planner.plan import ParallelConfig

    config = ParallelConfig(tp=2, micro_batch_size=2, num_micro_batches=4)
    return evaluate("llama-tiny", "cpu-local", config, devices_per_node=2, dtype="fp32")


def _world2() -> dict[str, dict]:
    cases: dict[str, dict] = {}
    for preset in PRESETS:
        cases[f"{preset} tp=2"] = dict(preset=preset, tp=2, num_micro_batches=4)
        cases[f"{preset} pp=2"] = dict(preset=preset, pp=2, num_micro_batches=4)
        cases[f"{preset} dp=2"] = dict(preset=preset, dp=2, num_micro_batches=2)
    return cases


WORLD2 = _world2()
WORLD4 = {f"{p} pp=2 tp=2": dict(preset=p, pp=2, tp=2, num_micro_batches=4) for p in PRESETS}
PLANNED = "llama-tiny tp=2 (planner's plan)"


def _jobs(cases: dict[str, dict]) -> list[Job]:
    jobs = [Job(name, make_plan(**spec), steps=STEPS, preset=tiny_preset(spec["preset"]))
            for name, spec in cases.items()]
    if cases is WORLD2:
        jobs.append(Job(PLANNED, planner_plan(), steps=STEPS, preset=tiny_preset("llama-tiny")))
    return jobs


@pytest.fixture(scope="module")
def references() -> dict:
    """(preset, lr) -> (losses, grad norms) of the single-process loop, global batch 8 in 4 micro-batches."""
    return preset_references(PRESETS)


@pytest.fixture(scope="module")
def world2_results() -> dict:
    return launch(2, run_jobs, _jobs(WORLD2))[0]


@pytest.fixture(scope="module")
def world4_results() -> dict:
    return launch(4, run_jobs, _jobs(WORLD4))[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(WORLD2))
def test_two_ranks_match_single_process(name, world2_results, references):
    _check(world2_results[name], references[(WORLD2[name]["preset"], LR)])


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(WORLD4))
def test_four_ranks_match_single_process(name, world4_results, references):
    _check(world4_results[name], references[(WORLD4[name]["preset"], LR)])


@pytest.mark.multiprocess
@pytest.mark.parametrize("preset", PRESETS)
def test_the_comparison_can_fail(preset, references):
    """A run that did not train (lr 0) is far outside the tolerance by step 2: the checks have teeth."""
    check_untrained_is_caught(references, preset)


def _split_param_count(plan: Plan) -> tuple[int, set[str]]:
    """(parameters one tp rank holds, the split Linears): split weights and colwise biases count 1/tp."""
    model = tiny_preset(plan.model.preset).build(device="meta")
    styles = generic_styles(plan, model, plan.model.layer_names)
    tp, total = plan.parallel.tp, 0
    for name, param in model.named_parameters():
        module, kind = name.rsplit(".", 1)
        split = module in styles and (kind == "weight" or isinstance(styles[module], ColwiseParallel))
        total += param.numel() // tp if split else param.numel()
    return total, set(styles)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [n for n in WORLD2 if "tp=2" in n])
def test_tp_ranks_hold_half_of_attention_and_ffn(name, world2_results):
    """Every q, k, v, o and feed-forward matrix is split in two; weights, grads and AdamW state follow (16 B each)."""
    plan = make_plan(**WORLD2[name])
    preset = plan.model.preset
    local, split = _split_param_count(plan)
    blocks = [n for n in plan.model.layer_names if n.startswith("blocks.")]
    assert {f"{b}.{m}" for b in blocks for m in (*ATTENTION, *FFN[preset])} <= split
    assert local < plan.model.param_count
    assert world2_results[name].model_state_bytes == 16 * local


# --- single process: pairs, head splits and refusals ----------------------------------------------------

def _styles_of(plan: Plan) -> dict[str, str]:
    model = tiny_preset(plan.model.preset).build(device="meta")
    return {m: f"{type(s).__name__}({s.input_layouts}->{s.output_layouts})"
            for m, s in generic_styles(plan, model, plan.model.layer_names).items()}


def test_swiglu_pairs_both_input_projections_with_the_output_one():
    assert linear_pairs(FeedForward(8, 16, activation="swiglu")) == {"gate": "down", "up": "down"}
    assert linear_pairs(FeedForward(8, 16, activation="gelu")) == {"up": "down"}


def test_pairs_come_in_the_forward_order_on_every_rank():
    """Every rank must see the same order: torch splits one module after another, and a rank that split
    ``up`` where another split ``gate`` trained on swapped shards (llama's old drift). Fresh modules sit at
    new addresses, so an order taken from a set of fx nodes would differ between these calls."""
    orders = {tuple(linear_pairs(FeedForward(8, 16, activation="swiglu"))) for _ in range(30)}
    assert orders == {("gate", "up")}


@pytest.mark.parametrize("preset", PRESETS)
def test_without_placements_attention_and_ffn_stay_split_into_their_partner(preset):
    styles = _styles_of(make_plan(preset=preset, tp=2, num_micro_batches=4))
    kept, summed = "ColwiseParallel((Replicate(),)->(Shard(dim=-1),))", "RowwiseParallel((Shard(dim=-1),)->(Replicate(),))"
    *cols, row = FFN[preset]
    for b in range(4):
        for m in ("attn.q", "attn.k", "attn.v", *cols):
            assert styles[f"blocks.{b}.{m}"] == kept
        assert styles[f"blocks.{b}.attn.o"] == styles[f"blocks.{b}.{row}"] == summed
    assert len(styles) == 4 * (4 + len(FFN[preset]))  # nothing outside the blocks is split


def test_half_a_swiglu_pair_is_gathered():
    """A split gate times a whole up projection would be wrong: the gate is gathered, down takes a whole input."""
    styles = _styles_of(make_plan(preset="llama-tiny", tp=2, num_micro_batches=4,
                                  styles={"blocks.0.ffn.gate": "colwise", "blocks.0.ffn.down": "rowwise"}))
    assert styles == {"blocks.0.ffn.gate": "ColwiseParallel((Replicate(),)->(Replicate(),))",
                      "blocks.0.ffn.down": "RowwiseParallel((Replicate(),)->(Replicate(),))"}


def test_attention_split_only_as_a_whole_keeps_heads_local():
    """q, k, v colwise without o rowwise: each projection is gathered (exact), the heads stay whole."""
    styles = _styles_of(make_plan(preset="bert-tiny", tp=2, num_micro_batches=4,
                                  styles={f"blocks.1.attn.{c}": "colwise" for c in "qkv"}))
    assert set(styles.values()) == {"ColwiseParallel((Replicate(),)->(Replicate(),))"}


def test_localized_heads_are_the_rank_share():
    from runtime.tensor_parallel_generic import localize_attention_heads

    model = tiny_preset("llama-tiny").build(device="meta")
    block = model.get_submodule("blocks.2")
    styles = {"attn.q": "colwise", "attn.k": "colwise", "attn.v": "colwise", "attn.o": "rowwise"}
    assert localize_attention_heads(block, styles, 2) == 1
    assert (block.attn.heads, block.attn.kv_heads) == (2, 1)
    assert localize_attention_heads(model.get_submodule("blocks.3"), {"attn.q": "colwise"}, 2) == 0


def _with(base: str, family: str | None = None, **config) -> ModelPreset:
    p = tiny_preset(base)
    return ModelPreset(name=p.name, family=family or p.family, config={**p.config, **config})


@pytest.mark.parametrize(("preset", "plan_args", "match"), [
    (_with("llama-tiny"), dict(tp=4), "blocks.0.attn: the attention's kv_heads=2 is split on tp=4"),
    (_with("t5-tiny"), dict(tp=2, styles={"embed.tokens": "vocab", "head.lm_head": "rowwise"}),
     r"embed.tokens: vocab \(splits dim 0\), dec_embed.tokens: replicate \(splits no dim\), head.lm_head: rowwise "
     r"\(splits dim 1\) share one weight"),
    (_with("resnet-tiny"), dict(tp=2, styles={"stem.conv": "colwise"}), "stem.conv: colwise on a Conv2d"),
    (_with("bert-tiny"), dict(tp=2, sequence_parallel=True), "sequence_parallel.*'gpt' and 'llama' families only"),
    (_with("bert-tiny"), dict(tp=2, styles={"head.decoder": "colwise"}),
     r"embed.word: replicate \(splits no dim\), head.decoder: colwise \(splits dim 0\) share one weight"),
    (_with("vit-tiny"), dict(tp=2, styles={"embed.proj": "colwise"}), "embed.proj: colwise on a Conv2d"),
])
def test_blocks_tp_refuses_with_the_field_and_the_fix(preset, plan_args, match):
    plan = make_plan(preset=preset.name, num_micro_batches=4, **plan_args)
    with pytest.raises(RunCheckError, match=match):
        check_tensor_parallel(plan, preset)


@pytest.mark.multiprocess
def test_planner_llama_plan_is_split_and_trains_as_one_process(world2_results, references):
    """The planner's tp=2 plan for llama-tiny splits every attention and SwiGLU matrix, and the runtime
    trains it to the single-process losses."""
    planned = planner_plan()
    assert planned.parallel.tp == 2
    _, split = _split_param_count(planned)
    assert {f"blocks.{b}.{m}" for b in range(4) for m in (*ATTENTION, *FFN["llama-tiny"])} <= split
    _check(world2_results[PLANNED], references[("llama-tiny", LR)])


def test_llama_sequence_parallel_needs_tp_to_divide_the_sequence():
    import dataclasses

    plan = make_plan(preset="llama-tiny", tp=2, num_micro_batches=4, sequence_parallel=True)
    odd = dataclasses.replace(plan, model=dataclasses.replace(plan.model, seq_len=31))
    with pytest.raises(RunCheckError, match=r"sequence_parallel: tp=2 does not divide .*seq_len=31"):
        check_tensor_parallel(odd, tiny_preset("llama-tiny"))


def equivalence_rows() -> list[str]:
    """The markdown table of docs/runtime.md: every plan above against the single-process loop."""
    refs = preset_references(PRESETS, (LR,))
    rows = list(EQUIVALENCE_HEADER)
    for nproc, table in ((2, WORLD2), (4, WORLD4)):
        results = launch(nproc, run_jobs, _jobs(table))[0]
        for name, r in results.items():
            preset = "llama-tiny" if name == PLANNED else table[name]["preset"]
            rows.append(equivalence_row(name, nproc, r, refs[(preset, LR)]))
    return rows


if __name__ == "__main__":
    print("\n".join(equivalence_rows()))

