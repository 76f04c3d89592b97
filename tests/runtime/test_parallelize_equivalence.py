"""``runtime.parallelize``: a user's own model in the user's own loop trains exactly as one process does.

Two models (:mod:`parallelize_models`): a hand-written language model whose head reads the embedding
(a skip across pipeline stages) and Hugging Face's ``LlamaForCausalLM`` from a small config. Each runs
the planner's plans (``planner.api.evaluate`` on ``cpu-local``) at pp=2, dp=2, tp=2, dp=2 + ZeRO-1, -2
and -3 (2 processes) and pp=2 x dp=2 (4 processes), through ``pm = parallelize(model, plan, loss_fn=...)``,
``pm.step`` and a plain ``torch.optim.AdamW`` over ``pm.parameters()``: 3 steps, every loss within 1e-5
of the single-process loop (fp32, gloo). One world per size runs every case. The 4-process world also
builds the skip model on the meta device under pp=2 x tp=2 and pp=2 x dp=2 + ZeRO-3 and measures the
parameter bytes each rank holds, and is handed a model with one block wider than planned.

A third model ties its head to its embedding (``TiedLM``); zb-v's V placement puts the embedding's stage
and the head's on rank 0, where they share one parameter: pp=2 zb-v (2 processes), and with dp=2 +
ZeRO-1 or tp=2 (4 processes). A fourth is the skip model fine-tuned: its embedding and first block frozen
(requires_grad=False), at pp=2, dp=2, tp=2 and dp=2 with ZeRO-1 and -3.

Run as a script, it prints the table of docs/train-your-own-model.md::

    .venv/bin/python tests/runtime/test_parallelize_equivalence.py
"""

from __future__ import annotations

import functools

import pytest
from parallelize_models import (
    LOSS_TOL,
    STEPS,
    build,
    plan_for,
    references,
    run_cases,
    sample_input,
)
from runtime_harness import launch

MODELS = ("skip", "llama")
WORLD2 = ("pp=2", "dp=2", "tp=2", "dp=2 zero1", "dp=2 zero2", "dp=2 zero3", "dp=2 zero3 recompute=op")
WORLD4 = ("pp=2 x dp=2",)
TIED2 = ("pp=2 zb-v",)  # the tied model: its embedding's and head's stages on one rank
TIED4 = ("pp=2 zb-v x dp=2 zero1", "pp=2 zb-v x tp=2")
FROZEN2 = ("pp=2", "dp=2", "tp=2", "dp=2 zero1", "dp=2 zero3")  # the skip model with its embedding and first block frozen
META = ("pp=2 x tp=2", "pp=2 x dp=2 zero3")
WIDER = "skip with blocks.1 twice as wide as planned"
RESUME = "skip: DCP saved under tp=2 after step 1, resumed under pp=2"
SAFETENSORS = "llama on meta, tp=2, from safetensors"


@functools.cache
def planned(model: str, config: str):
    return plan_for(model, config)


def _world(configs: tuple[str, ...], nproc: int, extras: bool, tied: tuple[str, ...] = ()) -> dict:
    cases = [(m, c, planned(m, c)) for m in MODELS for c in configs] + [("tied", c, planned("tied", c)) for c in tied]
    refused = [(WIDER, "skip", planned("skip", configs[0]), 1)] if extras else []
    meta = [planned("skip", c) for c in META] if extras else []
    return launch(nproc, run_cases, cases, refused, meta)


@pytest.fixture(scope="module")
def oracle() -> dict:
    return launch(1, references, [*MODELS, "tied", "frozen"])[0]


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict:
    """The 2-process cases, and two loads: a DCP checkpoint saved under tp=2 resumed under pp=2 (skip model),
    and Llama built on meta under tp=2, filled from the safetensors files of ``save_pretrained``."""
    hf = tmp_path_factory.mktemp("hf-llama")
    build("llama").save_pretrained(hf)
    loads = [(RESUME, planned("skip", "tp=2"), planned("skip", "pp=2"), str(tmp_path_factory.mktemp("dcp"))),
             (SAFETENSORS, planned("llama", "tp=2"), None, str(hf))]
    cases = [(m, c, planned(m, c)) for m in MODELS for c in WORLD2] + [("tied", c, planned("tied", c)) for c in TIED2]
    cases += [("frozen", c, planned("frozen", c)) for c in FROZEN2]
    return launch(2, run_cases, cases, [], [], loads)[0]


@pytest.fixture(scope="module")
def world4() -> dict:
    return _world(WORLD4, 4, extras=True, tied=TIED4)


def test_the_plans_split_what_they_say():
    """Each plan really is what its name says (else the equivalence below would test less)."""
    for model in MODELS:
        assert len(planned(model, "pp=2").stages) == 2
        assert any(s != "replicate" for s in planned(model, "tp=2").placements["style"].values())
        assert planned(model, "dp=2 zero3").parallel.zero_stage == 3
        assert planned(model, "dp=2 zero1").parallel.zero_stage == 1
        assert planned(model, "pp=2 x dp=2").parallel.world_size == 4
    for config in (*TIED2, *TIED4):  # V placement: the embedding's stage 0 and the head's stage 3 on one position
        stages = {s.index: s for s in planned("tied", config).stages}
        assert stages[0].ranks == stages[3].ranks and "embed" in stages[0].layer_names
        assert "head" in stages[3].layer_names


@pytest.mark.parametrize("model", MODELS)
def test_the_stage_cutter_finds_the_planners_layers(model):
    """The layer names the planner writes are the ones the runtime cuts the user's module at (fx for the
    hand-written model, torch.export for Llama), and the cut stages compute the model's output exactly."""
    import torch
    from parallelize_models import global_batch

    from runtime.model import build_stage_modules

    plan = planned(model, "pp=2")
    module = build(model)
    x, _ = global_batch(0)
    x = x[:2]
    stages = build_stage_modules(module, list(plan.stages), plan, sample_kwargs={
        **({"input_ids": x} if model == "llama" else {"tokens": x}), **({"use_cache": False} if model == "llama" else {})})
    called = [n.target for s in stages for n in s._graph.nodes if n.op == "call_module"]
    assert called == list(plan.model.layer_names)
    names = stages[0].input_names
    sent = stages[0](**dict(zip(names, (x,))))
    out = stages[1](*(sent if isinstance(sent, tuple) else (sent,)), **dict(zip(names, (x,))))
    expected = module(x)
    assert torch.equal(out, getattr(expected, "logits", expected))


def test_a_wider_model_is_refused_before_any_process_starts():
    """The fingerprint check alone (no process group): the message names the layer and both sizes."""
    from runtime import RunCheckError
    from runtime.checks import check_module_fingerprint

    with pytest.raises(RunCheckError, match=r"layer 'blocks\.1\.0' .*33280 parameters where the plan has 16640"):
        check_module_fingerprint(planned("skip", "dp=2"), build("skip", wide=1), sample_input("skip"))
    check_module_fingerprint(planned("skip", "dp=2"), build("skip"), sample_input("skip"))  # the planned one passes


def test_a_model_frozen_after_planning_is_refused_by_name():
    """The plan priced every parameter as trained; the frozen model traces otherwise, and the check says how."""
    from runtime import RunCheckError
    from runtime.checks import check_module_fingerprint

    with pytest.raises(RunCheckError, match=r"layer 'embed' .*8192 of its parameters are frozen \(requires_grad=False\) "
                                            r"where the plan has 0: freeze the model as it will train before planning"):
        check_module_fingerprint(planned("skip", "dp=2"), build("frozen"), sample_input("skip"))
    check_module_fingerprint(planned("frozen", "dp=2"), build("frozen"), sample_input("frozen"))


def _check(losses: list[float], reference: list[float]) -> None:
    assert len(losses) == STEPS
    diff = max(abs(a - b) for a, b in zip(losses, reference))
    assert diff <= LOSS_TOL, f"losses {losses} vs single process {reference}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("config", WORLD2)
def test_two_processes_train_as_one(model, config, world2, oracle):
    _check(world2["losses"][(model, config)], oracle[model])


@pytest.mark.multiprocess
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("config", WORLD4)
def test_four_processes_train_as_one(model, config, world4, oracle):
    _check(world4[0]["losses"][(model, config)], oracle[model])


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", TIED2)
def test_tied_stages_on_one_rank_train_as_one_process(config, world2, oracle):
    _check(world2["losses"][("tied", config)], oracle["tied"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", FROZEN2)
def test_frozen_parameters_stay_frozen_and_the_rest_trains_as_one_process(config, world2, oracle):
    """A fine-tuning run (embedding and first block requires_grad=False): the single process never changes the
    frozen weights, so equal losses over 3 steps mean the parallel run did not either; the plan priced them
    without gradients or optimizer state."""
    _check(world2["losses"][("frozen", config)], oracle["frozen"])
    plan = planned("frozen", config)
    assert any("are frozen (requires_grad=False): priced as held weights" in line for line in plan.explanation)


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", TIED4)
def test_tied_stages_on_one_rank_with_dp_or_tp(config, world4, oracle):
    _check(world4[0]["losses"][("tied", config)], oracle["tied"])


@pytest.mark.multiprocess
def test_zero1_holds_whole_parameters_and_a_slice_of_the_optimizer(world2):
    """ZeRO-1 and -2 (2 ranks): each rank holds the whole model's parameters, and AdamW's state (two moments,
    4 bytes each) of its half of every parameter: as many bytes as the parameters, but for the rounding of
    odd-sized tensors (one element, 8 bytes, per parameter tensor at most)."""
    for model in MODELS:
        whole = sum(p.numel() * 4 for p in build(model, device="meta").parameters())
        for config in ("dp=2 zero1", "dp=2 zero2"):
            resident, planned_bytes = world2["held"][(model, config)]
            assert resident == planned_bytes == whole, (model, config)
            optimizer, tensors = world2["optimizer"][(model, config)]
            assert 0 <= optimizer - whole <= 8 * tensors, (model, config)


@pytest.mark.multiprocess
def test_a_checkpoint_resumes_under_another_plan(world2, oracle):
    """Model and AdamW state saved by tp=2 ranks (DTensor shards) load into pp=2 stages of a model that started
    from other weights; steps 2 and 3 then give the single process's losses."""
    _check(world2["loads"][RESUME], oracle["skip"])


@pytest.mark.multiprocess
def test_safetensors_load_straight_into_meta_shards(world2, oracle):
    """Each tp rank reads only its slices of the Hugging Face files into its materialised shards."""
    _check(world2["loads"][SAFETENSORS], oracle["llama"])


@pytest.mark.multiprocess
def test_real_weights_keep_only_the_ranks_shards(world2, world4):
    """A model given with real weights: after ``parallelize`` each rank holds exactly the parameter bytes of its
    stages as split by tp and ZeRO-3 (the rest of the model freed), on rank 0 of each world."""
    for result in (world2, world4[0]):
        for case, (resident, planned_bytes) in result["held"].items():
            assert resident == planned_bytes, case


@pytest.mark.multiprocess
def test_the_losses_move(oracle):
    """Training changes the loss by far more than the tolerance, so a run that did not train would fail."""
    for model in MODELS:
        assert max(oracle[model]) - min(oracle[model]) > 100 * LOSS_TOL


@pytest.mark.multiprocess
def test_meta_model_holds_the_planned_bytes_on_every_rank(world4):
    """Built on meta and materialised shard by shard: each rank holds exactly its stages' parameters, split as
    the plan's tp styles and ZeRO-3 say (``planned_parameter_bytes``); under ZeRO-3 that is also the plan's own
    per-device weight bytes, less the gathered copy of the stage it counts for the step's peak (under a
    pipeline the stage stays gathered; fp32 gathers here, so the copy is ``shards`` times the shard). The first
    step's loss is finite (the shards were initialised)."""
    import math

    from planner.cost.sharding import keeps_gathered_weights, shard_size

    for rank, result in world4.items():
        for config, (resident, planned_bytes, predicted, first_loss) in zip(META, result["bytes"]):
            assert resident == planned_bytes, (rank, config)
            assert math.isfinite(first_loss)
            if "zero3" in config:
                par = planned("skip", config).parallel
                at_rest = predicted / (1 + shard_size(par)) if keeps_gathered_weights(par) else predicted
                assert resident == at_rest, (rank, config)
    # pp=2 x tp=2: no rank holds more than ~half the model's parameters (4 bytes each)
    total = planned("skip", "pp=2 x tp=2").model.param_count * 4
    assert all(r["bytes"][0][0] < 0.3 * total for r in world4.values())


@pytest.mark.multiprocess
def test_parallelize_refuses_a_model_the_plan_was_not_made_for(world4):
    message = world4[0]["refused"][WIDER]
    assert "blocks.1.0" in message and "33280 parameters where the plan has 16640" in message


def equivalence_rows() -> list[str]:
    """The two tables of docs/train-your-own-model.md: losses against one process, and bytes per rank on meta."""
    ref = launch(1, references, [*MODELS, "tied"])[0]
    labels = {"skip": "SkipLM (embedding -> head skip)", "llama": "LlamaForCausalLM (2 layers, hidden 64)",
              "tied": "TiedLM (head tied to the embedding)"}
    rows = ["| model | plan (planner, cpu-local) | ranks | max abs loss diff (3 steps) | wall s (3 steps) |",
            "|---|---|---|---|---|"]
    for configs, tied, nproc in ((WORLD2, TIED2, 2), (WORLD4, TIED4, 4)):
        worlds = _world(configs, nproc, extras=nproc == 4, tied=tied)
        result = worlds[0]
        for (model, config), losses in result["losses"].items():
            diff = max(abs(a - b) for a, b in zip(losses, ref[model]))
            label = labels[model]
            rows.append(f"| {label} | {config} | {nproc} | {diff:.1e} | {result['seconds'][(model, config)]:.2f} |")
    rows += ["", "| SkipLM on meta, plan | rank | resident parameter bytes | from the plan's stages and splits | "
             "plan's predicted weight bytes |", "|---|---|---|---|---|"]
    for rank, result in sorted(worlds.items()):
        for config, (resident, planned_bytes, predicted, _) in zip(META, result["bytes"]):
            rows.append(f"| {config} | {rank} | {resident} | {planned_bytes} | {predicted} |")
    return rows


if __name__ == "__main__":
    print("\n".join(equivalence_rows()))
