"""The runtime trains the T5, Mixtral, ResNet, wav2vec 2.0 and Deep Speech 2 families as one process does.

Multi-process part (marked ``multiprocess``): ``t5-tiny`` (two inputs, decoder blocks that read the
encoder output: a DAG of layers, cut by :mod:`runtime.layer_graph`), ``mixtral-tiny`` (top-2 MoE with
capacity), ``resnet-tiny`` and ``deepspeech2-tiny`` (BatchNorm in training mode) and ``wav2vec2-tiny``
(conv feature encoder, glue before its first layer) run pp=2 (1F1B), dp=2 and pp=2 x dp=2: 5 AdamW
steps in fp32 on gloo, losses within 1e-5 of a plain single-process loop and gradient norms within
1e-4 relative. Every plan keeps micro-batches of 2 rows, the reference's, so BatchNorm's batch
statistics and the MoE capacity are computed over the same rows as in one process.

Run as a script, it prints the equivalence table of docs/runtime.md ("Other model families")::

    .venv/bin/python tests/runtime/test_runtime_families.py
"""

from __future__ import annotations

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

from runtime.layer_graph import is_chain, stage_plans, trace_layers

PRESETS = ("t5-tiny", "mixtral-tiny", "resnet-tiny", "wav2vec2-tiny", "deepspeech2-tiny")

WORLD2 = {f"{p} {label}": dict(preset=p, **spec) for p in PRESETS
          for label, spec in (("pp=2 1f1b", dict(pp=2, num_micro_batches=4)), ("dp=2", dict(dp=2, num_micro_batches=2)))}
WORLD4 = {f"{p} pp=2 dp=2": dict(preset=p, pp=2, dp=2, num_micro_batches=2) for p in PRESETS}


def _jobs(cases: dict[str, dict]) -> list[Job]:
    return [Job(name, make_plan(**spec), steps=STEPS, preset=tiny_preset(spec["preset"])) for name, spec in cases.items()]


@pytest.fixture(scope="module")
def references() -> dict:
    """(preset, lr) -> (losses, grad norms) of the single-process loop; every plan here has global batch 8 in 4."""
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


# --- single process: how the layer graph is cut into stages -------------------------------------------------

def _cut(preset: str, pp: int = 2):
    plan = make_plan(preset=preset, pp=pp, num_micro_batches=4)
    graph = trace_layers(tiny_preset(preset).build(device="meta"), plan.model.layer_names)
    return graph, plan, stage_plans(graph, [s.layer_names for s in plan.stages])


def test_t5_decoder_stage_gets_the_encoder_output_and_reads_decoder_tokens_itself():
    graph, plan, (first, second) = _cut("t5-tiny")
    assert not is_chain(graph, plan.model.layer_names)
    assert first.input_names == ("enc_tokens", "dec_tokens")
    assert first.sends == ("enc_final",) and second.receives == ("enc_final",)
    assert [n.target for n in second.nodes] == ["dec_embed", "decoder.0", "decoder.1", "head"]


def test_t5_cut_inside_the_decoder_sends_both_streams():
    """At pp=4 the cut after decoder.0 carries the decoder stream and the encoder output."""
    _, _, plans = _cut("t5-tiny", pp=4)
    assert plans[2].receives == ("enc_final",)  # passed on from stage 0 through stage 1, made by stage 1
    assert plans[3].receives == ("enc_final", "decoder_0")


def test_wav2vec2_glue_before_the_first_layer_runs_in_the_first_stage():
    graph, plan, (first, _) = _cut("wav2vec2-tiny")
    assert not is_chain(graph, plan.model.layer_names)
    assert first.nodes[0].op == "call_method" and first.nodes[0].target == "unsqueeze"


@pytest.mark.parametrize("preset", ["mixtral-tiny", "resnet-tiny", "deepspeech2-tiny", "gpt-tiny"])
def test_chains_stay_chains(preset):
    graph, plan, _ = _cut(preset)
    assert is_chain(graph, plan.model.layer_names)


def equivalence_rows() -> list[str]:
    """The markdown table of docs/runtime.md: every plan above against the single-process loop."""
    refs = preset_references(PRESETS, (LR,))
    rows = list(EQUIVALENCE_HEADER)
    for nproc, table in ((2, WORLD2), (4, WORLD4)):
        results = launch(nproc, run_jobs, _jobs(table))[0]
        for name, spec in table.items():
            rows.append(equivalence_row(name, nproc, results[name], refs[(spec["preset"], LR)]))
    return rows


if __name__ == "__main__":
    print("\n".join(equivalence_rows()))
