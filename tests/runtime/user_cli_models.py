"""What a user hands ``python -m runtime run --model/--data/--loss``: factories, loaders and losses for the tests.

``gpt_tiny`` returns the preset's module with the weights a preset run starts from (seed 0), so a run through
``--model`` must give the single-process losses. ``recording_loader`` is a user's loader over the same
synthetic batches; with ``RUNTIME_TEST_RECORD`` set it saves each rank's first batch there, so a test can
check that the data-parallel ranks got different rows that together make the global batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F

from planner.models import load_preset
from runtime.data import synthetic_global_batch

RECORD_ENV = "RUNTIME_TEST_RECORD"  # RUNTIME_*: the launcher forwards it to the workers


def gpt_tiny() -> torch.nn.Module:
    return load_preset("gpt-tiny").build(device="cpu", dtype=torch.float32, seed=0)


def raises() -> torch.nn.Module:
    raise ValueError("no weights at /nonexistent")


def not_a_module() -> int:
    return 3


def mean_ce(output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), targets.reshape(-1))


def recording_loader(rank: int, world: int, batch_size: int, seed: int, first_step: int):
    preset = load_preset("gpt-tiny")
    step = first_step
    while True:
        x, y = synthetic_global_batch(preset, batch=batch_size * world, seq_len=preset.seq_len, seed=seed, step=step)
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        if step == first_step and os.environ.get(RECORD_ENV):
            torch.save({"rank": rank, "world": world, "inputs": x[rows], "targets": y[rows]},
                       Path(os.environ[RECORD_ENV]) / f"rank{rank}.pt")
        yield x[rows], y[rows]
        step += 1


def wrong_shape(rank: int, world: int):
    while True:
        yield torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long)


def no_rank(batch_size: int):
    yield from ()


class PositionTableModel(torch.nn.Module):
    """Token embedding plus a learned position table kept as a bare ``nn.Parameter`` on the model (in no layer)."""

    def __init__(self, vocab: int = 64, hidden: int = 32, seq_len: int = 8, layers: int = 4) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.pos = torch.nn.Parameter(torch.randn(seq_len, hidden) * 0.02)
        self.register_buffer("scale", torch.tensor(0.5))
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.GELU())
                                          for _ in range(layers))
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos * self.scale
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def position_table_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return PositionTableModel()


def position_batches(rank: int, world: int, batch_size: int, seed: int, first_step: int):
    """Random tokens of the global batch, this rank's rows (targets: the tokens shifted by one)."""
    step = first_step
    while True:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        tokens = torch.randint(0, 64, (batch_size * world, 9), generator=gen)
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        yield tokens[rows, :-1], tokens[rows, 1:]
        step += 1


class SmallCNN(torch.nn.Module):
    """An image classifier: its sample input is a float image batch, not token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()) for _ in range(3))
        self.head = torch.nn.Linear(8, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h = self.stem(images)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h.mean(dim=(2, 3)))


IMAGE = (3, 16, 16)


def small_cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return SmallCNN()


def image_loader(rank: int, world: int, batch_size: int, seed: int):
    step = 0
    while True:
        gen = torch.Generator().manual_seed(seed * 1000 + step)
        x = torch.randn(batch_size * world, *IMAGE, generator=gen)
        y = torch.randint(0, 10, (batch_size * world,), generator=gen)
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        yield x[rows], y[rows]
        step += 1


def counting_loader(rank: int, world: int, batch_size: int):
    """A loader that knows nothing of resuming: batch k holds the value k."""
    step = 0
    while True:
        yield torch.full((batch_size, 4), step), torch.full((batch_size,), step)
        step += 1


def varying_loader(rank: int, world: int, batch_size: int, seed: int):
    """gpt-tiny batches whose sequence length changes at the second step (a loader without padding)."""
    preset = load_preset("gpt-tiny")
    for step, seq in enumerate((preset.seq_len, preset.seq_len // 2)):
        x, y = synthetic_global_batch(preset, batch=batch_size * world, seq_len=seq, seed=seed, step=step)
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        yield x[rows], y[rows]
