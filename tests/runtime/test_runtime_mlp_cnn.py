"""The runtime trains the small MLP and CNN exactly as one process does, and splits the MLP on tp.

Multi-process part (marked ``multiprocess``): for ``mlp-tiny`` and ``cnn-tiny``, every synchronous
pipeline schedule at pp=2, dp=2 and pp=2 x dp=2, and for ``mlp-tiny`` tp=2 (the generic Linear
splits of :mod:`runtime.tensor_parallel_generic`, with and without the planner's style table) run 5
AdamW steps in fp32 on gloo; losses must match a plain single-process loop within 1e-5 and the
gradient norms within 1e-4 relative. One world per size runs all its plans in turn (world start-up
is most of the cost). The rest are single-process checks of what the generic tensor parallelism
accepts and refuses, and of what the planner writes for the MLP at tp=2.

Run as a script, it prints the equivalence table of docs/runtime.md ("Other model families")::

    .venv/bin/python tests/runtime/test_runtime_mlp_cnn.py
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
from torch import nn

from planner.plan import Plan
from runtime.errors import RunCheckError
from runtime.tensor_parallel import check_tensor_parallel
from runtime.tensor_parallel_generic import generic_styles, linear_pairs

PRESETS = ("mlp-tiny", "cnn-tiny")
# The synchronous schedules the search tries (planner.search.SYNC_DEFAULT), each at pp=2 with 4
# micro-batches of 2 (global batch 8); the looped and V-shaped ones hold 2 chunks per rank.
SCHEDULES = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2, "zb-h1": 1, "zb-h2": 1, "zb-v": 2, "dualpipe-v": 2}
MLP_TP_STYLES = {  # what `python -m planner plan --model mlp-tiny --tp 2` writes (test_planner_... checks it)
    "embed.proj": "rowwise", "head.fc": "colwise",
    **{f"blocks.{i}.{fc}": style for i in range(4) for fc, style in (("fc1", "colwise"), ("fc2", "rowwise"))},
}


def _world2() -> dict[str, dict]:
    cases: dict[str, dict] = {}
    for preset in PRESETS:
        for schedule, v in SCHEDULES.items():
            name = f"{preset} pp=2{' v=2' if v > 1 else ''} {schedule}"
            cases[name] = dict(preset=preset, pp=2, num_micro_batches=4, schedule=schedule, virtual_stages=v)
        cases[f"{preset} dp=2"] = dict(preset=preset, dp=2, num_micro_batches=2)
    cases["mlp-tiny tp=2 (pairs found by fx)"] = dict(preset="mlp-tiny", tp=2, num_micro_batches=4)
    # As the planner writes it: its search also sets sequence_parallel, which has nothing to split in an MLP.
    cases["mlp-tiny tp=2 planner styles, sp flag"] = dict(preset="mlp-tiny", tp=2, num_micro_batches=4,
                                                          styles=MLP_TP_STYLES, sequence_parallel=True)
    return cases


WORLD2 = _world2()
WORLD4 = {
    "mlp-tiny pp=2 dp=2": dict(preset="mlp-tiny", pp=2, dp=2, num_micro_batches=2),
    "cnn-tiny pp=2 dp=2": dict(preset="cnn-tiny", pp=2, dp=2, num_micro_batches=2),
    "mlp-tiny pp=2 tp=2 planner styles": dict(preset="mlp-tiny", pp=2, tp=2, num_micro_batches=4,
                                              styles=MLP_TP_STYLES),
    "mlp-tiny dp=2 tp=2": dict(preset="mlp-tiny", dp=2, tp=2, num_micro_batches=2),
}


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


def _local_param_count(plan: Plan) -> int:
    """Parameters a tp rank holds if the plan's Linears are really split: weights and colwise biases / tp."""
    model = tiny_preset(plan.model.preset).build(device="meta")
    styles = plan.placements.get("style") or {f"blocks.{i}.{fc}": style for i in range(4)
                                              for fc, style in (("fc1", "colwise"), ("fc2", "rowwise"))}
    total = 0
    for name, param in model.named_parameters():
        module, kind = name.rsplit(".", 1)
        split = styles.get(module, "replicate")
        total += param.numel() // plan.parallel.tp if (kind == "weight" and split != "replicate") or \
            (kind == "bias" and split == "colwise") else param.numel()
    return total


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", [n for n in WORLD2 if "tp=2" in n])
def test_tp_ranks_hold_their_shards_only(name, world2_results):
    """Weights, gradients and AdamW state (16 bytes a parameter in fp32) are those of the local shards."""
    plan = make_plan(**WORLD2[name])
    local = _local_param_count(plan)
    assert local < 0.55 * plan.model.param_count  # the feed-forward pairs are most of the model
    assert world2_results[name].model_state_bytes == 16 * local


@pytest.mark.multiprocess
@pytest.mark.parametrize("preset", PRESETS)
def test_the_comparison_can_fail(preset, references):
    """A run that did not train (lr 0) is far outside the tolerance by step 2: the checks have teeth."""
    check_untrained_is_caught(references, preset)


# --- single process: what the generic tensor parallelism accepts and refuses -----------------------------

def _styles_of(plan: Plan) -> dict[str, str]:
    """``{fqn: torch style, as text}`` that the runtime would apply to the whole model."""
    model = tiny_preset(plan.model.preset).build(device="meta")
    return {m: f"{type(s).__name__}({s.input_layouts}->{s.output_layouts})"
            for m, s in generic_styles(plan, model, plan.model.layer_names).items()}


def test_mlp_pairs_stay_split_and_lone_splits_are_gathered():
    styles = _styles_of(make_plan(preset="mlp-tiny", tp=2, num_micro_batches=4, styles=MLP_TP_STYLES))
    assert styles["blocks.0.fc1"] == "ColwiseParallel((Replicate(),)->(Shard(dim=-1),))"  # stays split ...
    assert styles["blocks.0.fc2"] == "RowwiseParallel((Shard(dim=-1),)->(Replicate(),))"  # ... into its partner
    assert styles["head.fc"] == "ColwiseParallel((Replicate(),)->(Replicate(),))"  # no partner: gathered
    assert styles["embed.proj"] == "RowwiseParallel((Replicate(),)->(Replicate(),))"  # no partner: sliced input
    assert len(styles) == 10


def test_without_placements_the_found_pairs_are_split():
    styles = _styles_of(make_plan(preset="mlp-tiny", tp=2, num_micro_batches=4))
    assert sorted(styles) == sorted(f"blocks.{i}.{fc}" for i in range(4) for fc in ("fc1", "fc2"))


class _NormBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 8)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


class _Elementwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.act, self.b, self.c = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 8)

    def forward(self, x):
        y = self.b(self.act(self.a(x)).tanh())
        return self.c(y) + y  # y has two users: c cannot read a split y


class _CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(self.a(x)))


def test_linear_pairs_need_elementwise_ops_only():
    assert linear_pairs(_NormBetween()) == {}  # LayerNorm mixes the split dim: a gather, not a pair
    assert linear_pairs(_Elementwise()) == {"a": "b"}
    assert linear_pairs(_CalledTwice()) == {}


def test_pairs_never_cross_layers_and_a_layer_may_itself_be_a_linear():
    """Layers ``0`` and ``2`` are Linears: each is split on its own, its input or output whole between layers."""
    chain = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    plan = make_plan(preset="mlp-tiny", tp=2, num_micro_batches=4, styles={"0": "colwise", "2": "rowwise"})
    styles = generic_styles(plan, chain, ("0", "1", "2"))
    assert str(styles["0"].output_layouts) == "(Replicate(),)"
    assert str(styles["2"].input_layouts) == "(Replicate(),)"


@pytest.mark.parametrize(("preset", "tp", "styles", "match"), [
    ("cnn-tiny", 2, {"blocks.0.conv": "colwise"}, "blocks.0.conv: colwise on a Conv2d"),
    ("mlp-tiny", 2, {"blocks.0.norm": "colwise"}, "blocks.0.norm: colwise on a LayerNorm"),
    ("mlp-tiny", 2, {"blocks.0.fc1": "vocab"}, "blocks.0.fc1: style 'vocab'"),
    ("mlp-tiny", 2, {"blocks.0.norm": "sequence"}, "blocks.0.norm: 'sequence'"),
    ("mlp-tiny", 2, {"blocks.9.fc1": "colwise"}, "blocks.9.fc1: colwise, but the module lies in none"),
    ("mlp-tiny", 2, {"blocks.0.fc9": "colwise"}, "blocks.0.fc9: no such module"),
    ("mlp-tiny", 3, None, "fc1: colwise splits out_features=256, which tp=3"),
])
def test_generic_tensor_parallel_refuses_with_the_module_and_the_fix(preset, tp, styles, match):
    plan = make_plan(preset=preset, tp=tp, num_micro_batches=4, styles=styles)
    with pytest.raises(RunCheckError, match=match):
        check_tensor_parallel(plan, tiny_preset(preset))


def test_planner_styles_for_mlp_at_tp2_are_what_the_runtime_runs():
    """The planner's intra-op ILP at tp=2 writes the table the multi-process test runs, and the runtime accepts it."""
    from planner.api import plan as make
    from planner.search import SearchSpace

    planned = make("mlp-tiny", "cpu-local", global_batch=8, devices_per_node=2, dtype="fp32", baselines=False,
                   space=SearchSpace(tp=(2,), pp=(1,), dp=(1,), micro_batch_size=(2,)))
    assert planned.parallel.tp == 2
    split = {m: s for m, s in planned.placements["style"].items() if s != "replicate"}
    assert split == MLP_TP_STYLES, (f"the planner now writes {split}; update MLP_TP_STYLES so that the "
                                    "multi-process cases run what the planner writes")
    check_tensor_parallel(planned, tiny_preset("mlp-tiny"))  # raises if the runtime could not run it


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
