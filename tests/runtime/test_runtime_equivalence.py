"""Every plan trains exactly what one process trains: same losses (<= 1e-5) and gradient norms.

Each plan of ``WORLD2`` / ``WORLD4`` (conftest) runs 5 AdamW steps of gpt-tiny in fp32 on gloo with
real ranks; the oracle is a plain single-process PyTorch loop on the same seed and data. Losses alone
would not catch a gradient off by a constant factor (Adam divides it out), so the global gradient
norm before each update is compared too.

Equal losses would not show that a sequence-parallel plan really ran sequence-parallel (tp alone
gives the same numbers), so :func:`test_sequence_parallel_keeps_the_residual_stream_split` looks at
the activations and gradients of one tp=2 + SP forward and backward.
"""

from __future__ import annotations

import pytest
from runtime_harness import LOSS_TOL
from runtime_harness import check_matches as _check
from runtime_plans import WORLD2, WORLD4, make_plan, tiny_preset

pytestmark = pytest.mark.multiprocess


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


def _sequence_parallel_probe(preset_name: str = "gpt-tiny",
                              names: tuple[str, ...] = ("embed", "blocks.0", "blocks.0.ln1", "blocks.3", "head")
                              ) -> dict:
    """Worker (2 ranks): ``preset_name`` at tp=2 with SP, one forward + backward; what ended up where."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    from runtime.data import synthetic_global_batch
    from runtime.launch import init_distributed
    from runtime.model import build_model, build_stage_modules, stages_of_rank
    from runtime.parallel_dims import ParallelDims
    from runtime.tensor_parallel import apply_tensor_parallel, reduce_partial_gradients

    torch.set_num_threads(1)
    init_distributed(60.0)
    plan = make_plan(preset=preset_name, tp=2, num_micro_batches=4, sequence_parallel=True)
    preset = tiny_preset(preset_name)
    mesh = ParallelDims.from_plan(plan, 2).build_mesh("cpu", timeout=timedelta(seconds=60))
    stage = build_stage_modules(build_model(preset, seed=0), stages_of_rank(plan, dist.get_rank()))[0]
    apply_tensor_parallel(stage, mesh["tp"], plan)
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = (type(out).__name__, tuple(out.shape), tuple(getattr(out, "placements", ())))
        return hook

    for name in names:
        stage.get_submodule(name).register_forward_hook(record(name))
    x, y = synthetic_global_batch(preset, batch=2, seq_len=plan.model.seq_len, seed=0, step=0)

    def loss_of(module):
        logits = module(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    loss_of(stage).backward()

    def partial():
        return sorted(n for n, p in stage.named_parameters()
                      if isinstance(p.grad, DTensor) and any(pl.is_partial() for pl in p.grad.placements))

    before = partial()
    reduced = reduce_partial_gradients([stage])
    reference = build_model(preset, seed=0)
    loss_of(reference).backward()
    norm_diff = max(float((stage.get_parameter(n).grad.full_tensor() - reference.get_parameter(n).grad).abs().max())
                    for n in before)
    dist.destroy_process_group()
    return {"seen": seen, "partial_before": before, "reduced": reduced, "partial_after": partial(),
            "norm_grad_diff": norm_diff}


def test_sequence_parallel_keeps_the_residual_stream_split():
    from torch.distributed.tensor import Shard

    from runtime.launch import launch_workers

    probe = launch_workers(2, _sequence_parallel_probe)[0]
    seen = probe["seen"]
    # gpt-tiny: batch 2, seq 64, hidden 128, vocab 8192. Between layers each rank holds 32 of the 64 positions.
    assert seen["embed"] == ("Tensor", (2, 32, 128), ())
    assert seen["blocks.0"] == seen["blocks.3"] == ("Tensor", (2, 32, 128), ())
    assert seen["blocks.0.ln1"] == ("DTensor", (2, 64, 128), (Shard(1),))  # global shape, split on the sequence
    assert seen["head"] == ("Tensor", (2, 64, 8192), ())  # whole logits: the loss is the single-device loss
    norms = sorted([f"blocks.{i}.{ln}.{p}" for i in range(4) for ln in ("ln1", "ln2") for p in ("weight", "bias")]
                   + ["head.ln_f.weight", "head.ln_f.bias"])
    assert probe["partial_before"] == norms  # each rank saw half the positions: its LayerNorm grads are partial
    assert probe["reduced"] == len(norms) and probe["partial_after"] == []
    assert probe["norm_grad_diff"] < 1e-6  # summed over tp, they are the single-process gradients


def test_llama_sequence_parallel_keeps_the_residual_stream_split():
    """The Llama family's sequence parallelism (runtime.sequence_parallel_llama): shards between the regions."""
    from runtime.launch import launch_workers

    names = ("embed", "blocks.0", "blocks.0.attn_norm", "blocks.0.attn", "blocks.3", "head")
    probe = launch_workers(2, _sequence_parallel_probe, "llama-tiny", names)[0]
    seen = probe["seen"]
    # llama-tiny: batch 2, seq 32, hidden 64, vocab 256. Between the regions each rank holds 16 of the 32 positions.
    local = ("Tensor", "AsyncCollectiveTensor")  # a plain tensor, or one whose collective is still in flight
    for name in ("embed", "blocks.0", "blocks.0.attn_norm", "blocks.0.attn", "blocks.3"):
        assert seen[name][0] in local and seen[name][1:] == ((2, 16, 64), ()), name
    assert seen["head"][0] in local and seen["head"][1:] == ((2, 32, 256), ())
    norms = sorted([f"blocks.{i}.{n}.weight" for i in range(4) for n in ("attn_norm", "ffn_norm")] + ["head.norm.weight"])
    assert probe["partial_before"] == norms
    assert probe["reduced"] == len(norms) and probe["partial_after"] == []
    assert probe["norm_grad_diff"] < 1e-6
