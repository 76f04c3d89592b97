"""Training data: the synthetic batches every test and demo uses, and the check on user batches.

A synthetic step ``s`` is the *global* batch drawn from ``seed`` and ``s`` alone, generated in full on
every rank and then sliced by the rank's dp index. So the numbers a rank sees depend on the plan
only through which rows it takes, and a (pp=2, dp=2) run trains on exactly the rows a single
process does: the basis of the numerical-equivalence tests.

A user dataloader yields ``(inputs, targets)`` for *this* dp rank: a batch of
``micro_batch_size * num_micro_batches`` samples (``inputs`` a tensor or a tuple with one tensor).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from planner.models import ModelPreset
from planner.plan import Plan
from runtime.errors import RunCheckError


def synthetic_global_batch(preset: ModelPreset, *, batch: int, seq_len: int | None, seed: int,
                           step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, targets)`` of step ``step``: the same on every rank and under every plan."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    (shape_like,) = preset.sample_input(batch, seq_len, device="meta")
    if shape_like.dtype.is_floating_point:
        inputs = torch.randn(shape_like.shape, generator=gen)
    else:
        high = int(preset.config.get("vocab_size", 2))
        inputs = torch.randint(0, high, shape_like.shape, generator=gen, dtype=shape_like.dtype)
    targets = preset.spec.targets(preset.config, batch, seq_len, gen)
    return inputs, targets


def local_rows(plan: Plan, dp_index: int) -> slice:
    rows = plan.parallel.micro_batch_size * plan.parallel.num_micro_batches
    return slice(dp_index * rows, (dp_index + 1) * rows)


class SyntheticData:
    """Iterator over this dp rank's slice of the synthetic global batches, starting at ``first_step``."""

    def __init__(self, plan: Plan, preset: ModelPreset, *, seed: int, dp_index: int, first_step: int = 0) -> None:
        self.plan, self.preset, self.seed = plan, preset, seed
        self.rows = local_rows(plan, dp_index)
        self.step = first_step

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = synthetic_global_batch(self.preset, batch=self.plan.parallel.global_batch,
                                                 seq_len=self.plan.model.seq_len, seed=self.seed, step=self.step)
        self.step += 1
        return inputs[self.rows], targets[self.rows]


def check_local_batch(batch: object, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """A user batch must be ``(inputs, targets)`` with this dp rank's number of samples."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise RunCheckError(f"dataloader: yielded {type(batch).__name__}; yield (inputs, targets) tuples")
    inputs, targets = batch
    if isinstance(inputs, (tuple, list)):
        if len(inputs) != 1:
            raise RunCheckError(f"dataloader: inputs has {len(inputs)} tensors; the planned models take one")
        inputs = inputs[0]
    rows = plan.parallel.micro_batch_size * plan.parallel.num_micro_batches
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != rows:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RunCheckError(
                f"dataloader: {name} has shape {got}; each dp rank takes micro_batch_size x num_micro_batches = "
                f"{plan.parallel.micro_batch_size} x {plan.parallel.num_micro_batches} = {rows} samples per step")
    return inputs, targets


def as_iterator(data: Iterable | None, default: SyntheticData) -> Iterator:
    return iter(data) if data is not None else default
