"""The runtime runs the planner's own tensor-parallel plans for every model family, as one process trains.

For each tiny preset (one per family, eleven in all) the planner prices tp=2 and pp=2 x tp=2
(``planner.api.evaluate``: its intra-op solver writes which Linear, Embedding and bias table is split
how, its stage DP where the pipeline is cut), and the runtime trains those plans on gloo: 5 AdamW
steps in fp32, losses within 1e-5 of the plain single-process loop and gradient norms within 1e-4
relative. These are the plans a user gets, splits of tied weights (BERT, T5), T5's per-head
position bias (also with its tables split by buckets or whole, as the planner may choose), Mixtral's router, convolutional and recurrent models' heads included; the other
runtime tests use hand-written plans. The GPT, Llama and Mixtral plans also run with sequence
parallelism, the families the runtime splits along the sequence, and the 4-head presets also at
tp=4 (one head per rank). One more case covers a tied GPT with Megatron's
vocabulary-parallel embedding and LM head, split across two pipeline stages.

Run as a script, it prints the table of docs/runtime.md ("The planner's own plans"), and with
``--bars`` each preset's gradient-norm bar::

    .venv/bin/python tests/runtime/test_runtime_planner_plans.py [--bars]
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
from runtime_harness import (
    EQUIVALENCE_HEADER,
    LR,
    NORM_RTOL,
    STEPS,
    Job,
    equivalence_row,
    launch,
    rounding_rtol,
    run_jobs,
    run_reference,
)
from runtime_harness import check_matches as _check
from runtime_plans import make_plan, tiny_preset

from planner.plan import Plan

PRESETS = ("gpt-tiny", "mlp-tiny", "cnn-tiny", "llama-tiny", "mixtral-tiny", "bert-tiny", "vit-tiny", "t5-tiny",
           "wav2vec2-tiny", "resnet-tiny", "deepspeech2-tiny")
GPT_BLOCK = {"attn.qkv": "colwise", "attn.proj": "rowwise", "mlp.fc1": "colwise", "mlp.fc2": "rowwise"}
TIED_GPT = "gpt-tiny tied pp=2 tp=2 (vocab-parallel embedding + LM head)"
BIAS_STYLES = ("vocab", "replicate")
SEQUENCE_PARALLEL = ("gpt-tiny", "llama-tiny", "mixtral-tiny")  # the families the runtime splits along the sequence
TP4 = ("gpt-tiny", "llama-tiny", "mixtral-tiny", "bert-tiny", "t5-tiny")  # 4 heads: one per rank at tp=4


@functools.cache
def planned(preset: str, pp: int, sequence_parallel: bool = False, tp: int = 2) -> Plan:
    """The planner's plan for ``preset`` at ``tp`` and ``pp``: micro-batches of 2, 4 of them (global batch 8)."""
    from planner.api import evaluate
    from planner.plan import ParallelConfig

    config = ParallelConfig(tp=tp, pp=pp, micro_batch_size=2, num_micro_batches=4,
                            sequence_parallel=sequence_parallel)
    return evaluate(preset, "cpu-local", config, devices_per_node=tp * pp, dtype="fp32")


def tied_gpt_plan() -> Plan:
    styles = {f"blocks.{b}.{m}": s for b in range(4) for m, s in GPT_BLOCK.items()}
    return make_plan(preset="gpt-tiny", tie=True, pp=2, tp=2, num_micro_batches=4,
                     styles={**styles, "embed.wte": "vocab", "head.lm_head": "colwise"})


def t5_with_bias_tables(style: str, tp: int = 2) -> Plan:
    """The planner's t5-tiny plan at ``tp`` with every relative-position bias table split ``style`` instead
    (``vocab``: by bucket rows, as the planner chooses for t5-11b's decoder; ``replicate``: whole)."""
    plan = planned("t5-tiny", 1, tp=tp)
    styles = {m: (style if m.endswith("rel_bias") else s) for m, s in plan.placements["style"].items()}
    return dataclasses.replace(plan, placements=dataclasses.replace(plan.placements, style=styles))


def _jobs(pp: int) -> list[Job]:
    jobs = [Job(f"{p} {'pp=2 ' if pp > 1 else ''}tp=2", planned(p, pp), steps=STEPS, preset=tiny_preset(p))
            for p in PRESETS]
    if pp == 1:
        jobs += [Job(f"t5-tiny tp=2, bias tables {s}", t5_with_bias_tables(s), steps=STEPS,
                     preset=tiny_preset("t5-tiny")) for s in BIAS_STYLES]
    jobs += [Job(f"{p} {'pp=2 ' if pp > 1 else ''}tp=2 sequence parallel", planned(p, pp, True), steps=STEPS,
                 preset=tiny_preset(p)) for p in SEQUENCE_PARALLEL]
    if pp > 1:  # the same 4-rank world also runs tp=4 (one head per rank for the 4-head presets)
        jobs += [Job(tp4_name(p), planned(p, 1, p in SEQUENCE_PARALLEL, tp=4), steps=STEPS, preset=tiny_preset(p))
                 for p in TP4]
        jobs.append(Job("t5-tiny tp=4, bias tables replicate", t5_with_bias_tables("replicate", tp=4), steps=STEPS,
                        preset=tiny_preset("t5-tiny")))
    if pp > 1:
        jobs.append(Job(TIED_GPT, tied_gpt_plan(), steps=STEPS, preset=tiny_preset("gpt-tiny", True)))
    return jobs


def tp4_name(preset: str) -> str:
    return f"{preset} tp=4{' sequence parallel' if preset in SEQUENCE_PARALLEL else ''}"


def _preset_of(name: str) -> tuple[str, bool | None]:
    return ("gpt-tiny", True) if name == TIED_GPT else (name.split()[0].rstrip(","), None)


def _references() -> dict:
    """(preset, tie) -> (losses, grad norms) of the single-process loop, global batch 8 in 4 micro-batches."""
    keys = [(p, None) for p in PRESETS] + [("gpt-tiny", True)]
    return launch(1, run_reference, [(k, make_plan(preset=k[0], tie=k[1], num_micro_batches=4), tiny_preset(*k), LR)
                                      for k in keys], STEPS)[0]


@pytest.fixture(scope="module")
def references() -> dict:
    return _references()


def _norm_rtols() -> dict:
    keys = [(p, None) for p in PRESETS] + [("gpt-tiny", True)]
    return launch(1, rounding_rtol, [(k, make_plan(preset=k[0], tie=k[1], num_micro_batches=4), tiny_preset(*k))
                                      for k in keys], STEPS)[0]


@pytest.fixture(scope="module")
def norm_rtol() -> dict:
    return _norm_rtols()


@pytest.fixture(scope="module")
def world2_results() -> dict:
    return launch(2, run_jobs, _jobs(1))[0]


@pytest.fixture(scope="module")
def world4_results() -> dict:
    return launch(4, run_jobs, _jobs(2))[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_the_planner_splits_something_in_every_family(preset):
    """A plan that split nothing would make the runs below plain replication: every family's tp=2 plan splits
    at least one module, and its pp=2 x tp=2 plan cuts the model into two stages."""
    styles = planned(preset, 1).placements["style"]
    assert any(s != "replicate" for s in styles.values())
    assert planned(preset, 1).parallel.tp == 2
    assert len(planned(preset, 2).stages) == 2


@pytest.mark.multiprocess
def test_only_t5_needs_a_wider_gradient_norm_bar(norm_rtol):
    """The bar derived from rounding stays the fixed 1e-4 for every preset whose fp32 run is that accurate."""
    wider = {k[0] for k, v in norm_rtol.items() if v > NORM_RTOL}
    assert wider <= {"t5-tiny"}
    assert norm_rtol[("t5-tiny", None)] < 1e-3


@pytest.mark.multiprocess
@pytest.mark.parametrize("preset", PRESETS)
def test_planner_tp_plan_trains_as_one_process(preset, world2_results, references, norm_rtol):
    _check(world2_results[f"{preset} tp=2"], references[(preset, None)], norm_rtol[(preset, None)])


@pytest.mark.multiprocess
@pytest.mark.parametrize("style", BIAS_STYLES)
def test_t5_bias_tables_split_any_way_beside_split_heads(style, world2_results, references, norm_rtol):
    """Each rank adds its own heads' bias whether the table is split by heads, by buckets, or whole."""
    assert {s for m, s in t5_with_bias_tables(style).placements["style"].items() if m.endswith("rel_bias")} == {style}
    _check(world2_results[f"t5-tiny tp=2, bias tables {style}"], references[("t5-tiny", None)],
           norm_rtol[("t5-tiny", None)])


@pytest.mark.multiprocess
@pytest.mark.parametrize("preset", SEQUENCE_PARALLEL)
def test_planner_sequence_parallel_plans_train_as_one_process(preset, world2_results, world4_results, references,
                                                              norm_rtol):
    assert planned(preset, 1, True).parallel.sequence_parallel
    for results, name in ((world2_results, f"{preset} tp=2 sequence parallel"),
                          (world4_results, f"{preset} pp=2 tp=2 sequence parallel")):
        _check(results[name], references[(preset, None)], norm_rtol[(preset, None)])


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [tp4_name(p) for p in TP4] + ["t5-tiny tp=4, bias tables replicate"])
def test_planner_tp4_plans_train_as_one_process(name, world4_results, references, norm_rtol):
    """tp=4 (sequence parallel where the family runs it): the planner keeps llama-tiny's 2 key/value heads whole
    rather than split them 4 ways, and T5's whole bias tables give each rank its one head."""
    _check(world4_results[name], references[_preset_of(name)], norm_rtol[_preset_of(name)])


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [f"{p} pp=2 tp=2" for p in PRESETS] + [TIED_GPT])
def test_planner_pp_tp_plan_trains_as_one_process(name, world4_results, references, norm_rtol):
    _check(world4_results[name], references[_preset_of(name)], norm_rtol[_preset_of(name)])


def equivalence_rows() -> list[str]:
    """The markdown table of docs/runtime.md: every plan above against the single-process loop."""
    refs = _references()
    rows = list(EQUIVALENCE_HEADER)
    for nproc, pp in ((2, 1), (4, 2)):
        for name, r in launch(nproc, run_jobs, _jobs(pp))[0].items():
            rows.append(equivalence_row(name, nproc, r, refs[_preset_of(name)]))
    return rows


if __name__ == "__main__":
    import sys

    if "--bars" in sys.argv:  # the gradient-norm bar of each preset (runtime_harness.rounding_rtol)
        for (preset, tie), bar in _norm_rtols().items():
            why = "the fixed bar" if bar == NORM_RTOL else f"4 x its fp32-vs-fp64 error {bar / 4:.1e}"
            print(f"{preset}{' tied' if tie else ''}: gradient-norm bar {bar:.1e} ({why})")
    else:
        print("\n".join(equivalence_rows()))
