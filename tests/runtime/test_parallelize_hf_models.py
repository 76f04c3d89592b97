"""Hugging Face models through ``runtime.parallelize``, one path for all: GPT-2, Llama, Mistral, Qwen2, BERT, T5, ViT.

Each is built from a small config (2 layers, hidden 64, no download, dropout off), planned by the
planner at pp=2 and tp=2 on ``cpu-local``, and trained for 3 AdamW steps on 2 gloo processes with the
user's loop; every loss within 1e-5 of plain single-process PyTorch. pp=2 cuts each model's
``torch.export`` graph at the planner's layer names (T5: two inputs, an encoder-decoder DAG, a dropout
module called in both stages; GPT-2: the embedding tied to the LM head across the two stages; ViT:
pixels in, classes out). Llama's pp=2 and other plans are in test_parallelize_equivalence.py; its tp=2
run is here, in the same world, so that the tp table covers every model.

At tp=2 each rank holds only its shards: its resident parameter bytes are the whole model's less
``(1 - 1/tp)`` of every tensor the plan splits, counted here from the plan's styles alone (a Linear's
or ``Conv1D``'s weight, and its bias when column-parallel; an Embedding's table; a tied tensor once).
GPT-2's projections are transformers' ``Conv1D`` (``W [in, out]``), split like Linears; BERT's MLM
decoder bias, tied to ``cls.predictions.bias``, is split with the decoder.
Run as a script, it prints the table of docs/train-your-own-model.md::

    .venv/bin/python tests/runtime/test_parallelize_hf_models.py
"""

from __future__ import annotations

import functools

import pytest
from parallelize_models import HF_ZOO, LOSS_TOL, STEPS, build, plan_for, references, run_cases
from runtime_harness import launch
from torch import nn

CONFIGS = ("pp=2", "tp=2")
TP_MODELS = ("gpt2", "llama", "mistral", "qwen2", "bert", "t5", "vit")
CASES = [(m, c) for m in HF_ZOO for c in CONFIGS] + [("llama", "tp=2")]


@functools.cache
def planned(model: str, config: str):
    return plan_for(model, config)


@pytest.fixture(scope="module")
def oracle() -> dict:
    return launch(1, references, sorted({m for m, _ in CASES}))[0]


@pytest.fixture(scope="module")
def world2() -> dict:
    """Both ranks' results of every case, one world launch."""
    return launch(2, run_cases, [(m, c, planned(m, c)) for m, c in CASES])


@pytest.mark.multiprocess
@pytest.mark.parametrize("model, config", CASES)
def test_hugging_face_model_trains_as_one_process(model, config, world2, oracle):
    losses = world2[0]["losses"][(model, config)]
    assert len(losses) == STEPS
    assert max(abs(a - b) for a, b in zip(losses, oracle[model])) <= LOSS_TOL, (losses, oracle[model])
    assert max(oracle[model]) - min(oracle[model]) > 100 * LOSS_TOL  # a run that did not train would fail


def split_share_bytes(model_name: str, plan) -> tuple[int, int]:
    """``(whole model's parameter bytes, bytes tp takes off each rank)`` from the plan's styles (see the docstring)."""
    model = build(model_name, device="meta")
    styles = plan.placements.get("style", {})
    tp = plan.parallel.tp
    split: dict[int, int] = {}  # id(param) -> its bytes, if some module splits it
    whole: dict[int, int] = {}
    for fqn, module in model.named_modules(remove_duplicate=False):
        style = styles.get(fqn, "replicate")
        conv1d = type(module).__name__ == "Conv1D"
        for name, p in module.named_parameters(recurse=False):
            whole[id(p)] = p.numel() * p.element_size()
            by_linear = (isinstance(module, nn.Linear) or conv1d) and \
                (style == "colwise" or (style == "rowwise" and name == "weight"))
            by_embedding = isinstance(module, nn.Embedding) and style in ("colwise", "vocab")
            if by_linear or by_embedding:
                split[id(p)] = whole[id(p)] * (tp - 1) // tp
    return sum(whole.values()), sum(split.values())


@pytest.mark.multiprocess
@pytest.mark.parametrize("model", TP_MODELS)
def test_each_tp_rank_holds_only_its_shards(model, world2):
    plan = planned(model, "tp=2")
    total, share = split_share_bytes(model, plan)
    assert share > 0.3 * total  # the plan splits attention, MLP and (but ViT) embeddings: 41-50% of the bytes
    for rank in (0, 1):
        resident, planned_bytes = world2[rank]["held"][(model, "tp=2")]
        assert resident == total - share == planned_bytes, (rank, resident, total, share)


def test_the_plans_cut_and_split():
    """Every pp=2 plan has two stages; every tp=2 plan splits its attention and MLP projections, GPT-2's
    ``Conv1D`` ones included (Megatron's pairs: column- then row-parallel)."""
    for model in HF_ZOO:
        assert len(planned(model, "pp=2").stages) == 2
    styles = planned("gpt2", "tp=2").placements["style"]
    for block in ("transformer.h.0", "transformer.h.1"):
        assert styles[f"{block}.attn.c_attn"] == styles[f"{block}.mlp.c_fc"] == "colwise"
        assert styles[f"{block}.attn.c_proj"] == styles[f"{block}.mlp.c_proj"] == "rowwise"
    assert planned("bert", "tp=2").placements["style"]["cls.predictions.decoder"] == "colwise"


def rows() -> list[str]:
    """The table of docs/train-your-own-model.md ("Other Hugging Face models")."""
    ref = launch(1, references, sorted({m for m, _ in CASES}))[0]
    result = launch(2, run_cases, [(m, c, planned(m, c)) for m, c in CASES])
    out = ["| model (transformers, small config) | plan | ranks | max abs loss diff (3 steps) | "
           "parameter bytes per rank / whole model |", "|---|---|---|---|---|"]
    for m, c in CASES:
        diff = max(abs(a - b) for a, b in zip(result[0]["losses"][(m, c)], ref[m]))
        total, _ = split_share_bytes(m, planned(m, c))
        held = "/".join(str(result[r]["held"][(m, c)][0]) for r in (0, 1))
        out.append(f"| {m} | {c} | 2 | {diff:.1e} | {held} / {total} |")
    return out


if __name__ == "__main__":
    print("\n".join(rows()))
