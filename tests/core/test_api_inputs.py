"""The Python API with a user's own module and bad arguments: a clear SpecError naming the field, never a
traceback from deep inside nor a confident plan of something that cannot run (found by trying the API as a
user would, on models no preset covers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from planner import ClusterSpec, ParallelConfig, evaluate, plan
from planner.errors import SpecError
from planner.space import SearchSpace


class Chain(nn.Module):
    def __init__(self, vocab: int = 128, width: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(depth)])
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for block in self.blocks:
            x = torch.relu(block(x))
        return self.head(x)


class Raises(Chain):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise ValueError("bug in my forward")


class ReadsValues(nn.Module):
    """Data-dependent Python: cannot run on meta, so it is estimated (an opaque leaf), not refused."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
            if x.sum().item() > 0:
                x = x * 2
        return x


IDS = torch.zeros(1, 16, dtype=torch.long)


def _plan(model, **kw):
    kw.setdefault("sample_input", IDS)
    return plan(model, "cpu-local", global_batch=kw.pop("global_batch", 8), baselines=False, **kw)


@pytest.mark.parametrize("model,sample,fragment", [
    (Raises(), IDS, "ValueError: bug in my forward"),
    (Chain(), torch.zeros(1, 16), "indices"),  # float token ids into an embedding
    (Chain(), torch.zeros(0, 16, dtype=torch.long), "dim 0 is the batch"),
])
def test_a_forward_that_fails_on_its_input_is_refused_not_estimated(model, sample, fragment):
    with pytest.raises(SpecError, match="sample_input") as err:
        _plan(model, sample_input=sample)
    assert fragment in str(err.value)


def test_code_that_only_needs_tensor_values_is_still_estimated():
    p = _plan(ReadsValues(), sample_input=torch.zeros(1, 16))
    assert p.predicted.fits and any("opaque" in line for line in p.explanation)


def test_a_module_plan_is_one_the_runtime_runs_no_sequence_or_context_parallelism():
    p = plan(Chain(width=64), "dgx-a100-80g", global_batch=1, sample_input=IDS, baselines=False)
    assert not p.parallel.sequence_parallel and p.parallel.cp == 1
    with pytest.raises(SpecError, match="sequence_parallel"):
        plan(Chain(), "dgx-a100-80g", global_batch=8, sample_input=IDS, space=SearchSpace(sequence_parallel=(True,)))
    with pytest.raises(SpecError, match="sequence_parallel"):
        evaluate(Chain(), "dgx-a100-80g", ParallelConfig(dp=4, tp=2, sequence_parallel=True), sample_input=IDS)


def test_seq_len_a_module_does_not_show_is_refused():
    with pytest.raises(SpecError, match="seq_len.*now 16"):
        _plan(Chain(), seq_len=4096)
    assert _plan(Chain(), seq_len=16).model.seq_len == 16


@pytest.mark.parametrize("kwargs,field", [
    ({"top_k": 0}, "top_k"), ({"top_k": 2.5}, "top_k"), ({"time_limit_s": -1}, "time_limit_s"),
    ({"time_limit_s": float("nan")}, "time_limit_s"), ({"constants": {"gemm_efficiency_max": 0.5}}, "constants"),
])
def test_plan_arguments_are_checked_before_any_work(kwargs, field):
    with pytest.raises(SpecError, match=field):
        plan("gpt-tiny", "cpu-local", global_batch=8, **kwargs)


@pytest.mark.parametrize("kwargs,field", [
    ({"pp": (0,)}, "pp"), ({"pp": 4}, "pp"), ({"tp": ()}, "tp"), ({"recompute": ("bogus",)}, "recompute"),
    ({"zero_stage": (4,)}, "zero_stage"), ({"schedules": ("1f1x",)}, "schedules"),
    ({"sequence_parallel": (1,)}, "sequence_parallel"), ({"max_micro_batch_size": 0}, "max_micro_batch_size"),
])
def test_search_space_fields_are_checked(kwargs, field):
    with pytest.raises(SpecError, match=field):
        SearchSpace(**kwargs)


def test_numpy_integers_are_integers_and_a_folder_is_no_plan_file(tmp_path):
    p = plan("gpt-tiny", "cpu-local", global_batch=np.int64(8), baselines=False)
    assert p.parallel.global_batch == 8
    with pytest.raises(SpecError, match="folder"):
        p.to_json(tmp_path, force=True)


def test_tp_prices_what_its_solve_leaves_whole_at_full_cost():
    """An LSTM is replicated by the intra-op solve (no strategy splits it), so every tp rank runs all of it
    and holds all its weights: tp must not divide its compute or its parameters."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(256, 128)
            self.rnns = nn.ModuleList([nn.LSTM(128, 128, batch_first=True) for _ in range(2)])
            self.head = nn.Linear(128, 256)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            x = self.emb(ids)
            for rnn in self.rnns:
                x = rnn(x)[0]
            return self.head(x)

    ids = torch.zeros(1, 64, dtype=torch.long)
    cluster = ClusterSpec.preset("dgx-a100-80g", nodes=1)
    one = evaluate(Recurrent(), cluster, ParallelConfig(dp=8, tp=1, micro_batch_size=8), sample_input=ids)
    four = evaluate(Recurrent(), cluster, ParallelConfig(dp=2, tp=4, micro_batch_size=8), sample_input=ids)
    lstm_weights = 2 * 4 * (128 * 128 * 2 + 2 * 128) * 2  # two LSTMs, bf16
    assert four.predicted.devices[0].memory_bytes["weights"] >= lstm_weights
    assert four.predicted.time_breakdown_s["compute"] > 0.5 * one.predicted.time_breakdown_s["compute"]


def test_selective_recompute_needs_attention_submodules_in_a_module_of_ones_own():
    """The runtime recomputes selectively each layer's ``attn`` submodule; a CNN has none, so the search
    leaves selective out and asking for it is an error, where the runtime refused it at start before."""

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(3)])
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.blocks(x).mean((2, 3)))

    x = torch.zeros(1, 8, 16, 16)
    assert _plan(CNN(), sample_input=x).parallel.recompute != "selective"
    with pytest.raises(SpecError, match="recompute"):
        _plan(CNN(), sample_input=x, space=SearchSpace(recompute=("selective",)))
    with pytest.raises(SpecError, match="attn"):
        evaluate(CNN(), "cpu-local", ParallelConfig(dp=2, recompute="selective"), sample_input=x)


def test_frozen_parameters_and_buffers_are_said_not_silently_priced():
    """Frozen parameters are priced as trained and buffers are not counted: the plan says both."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 10))
    for p in model[:2].parameters():
        p.requires_grad_(False)
    model.register_buffer("table", torch.zeros(2**19))
    p = evaluate(model, "cpu-local", ParallelConfig(dp=2), sample_input=torch.zeros(1, 64))
    assert any("8,320 of 8,970 parameters are frozen" in line for line in p.explanation)
    assert any("2.0 MiB of buffers" in line for line in p.explanation)
    plain = evaluate(Chain(), "cpu-local", ParallelConfig(dp=2), sample_input=IDS)
    assert not any("frozen" in line or "buffers" in line for line in plain.explanation)
