"""Training data: the synthetic batches every test and demo uses, and the check on user batches.

A synthetic step ``s`` is the *global* batch drawn from ``seed`` and ``s`` alone, generated in full on
every rank and then sliced by the rank's dp index. So the numbers a rank sees depend on the plan
only through which rows it takes, and a (pp=2, dp=2) run trains on exactly the rows a single
process does: the basis of the numerical-equivalence tests.

A user dataloader yields ``(inputs, targets)`` for *this* dp rank: a batch of
``micro_batch_size * num_micro_batches`` samples (``inputs`` a tensor or a tuple with one tensor per
model input: T5 takes encoder and decoder tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from planner.models import ModelPreset
from planner.plan import Plan
from runtime.errors import RunCheckError

Inputs = torch.Tensor | tuple[torch.Tensor, ...]  # one tensor, or one per model input (T5: encoder, decoder tokens)


def synthetic_global_batch(preset: ModelPreset, *, batch: int, seq_len: int | None, seed: int,
                           step: int) -> tuple[Inputs, torch.Tensor]:
    """``(inputs, targets)`` of step ``step``: the same on every rank and under every plan.

    ``inputs`` is a tensor for a model with one input, else a tuple in the forward's argument order."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    drawn = []
    for shape_like in preset.sample_input(batch, seq_len, device="meta"):
        if shape_like.dtype.is_floating_point:
            drawn.append(torch.randn(shape_like.shape, generator=gen))
        else:
            high = int(preset.config.get("vocab_size", 2))
            drawn.append(torch.randint(0, high, shape_like.shape, generator=gen, dtype=shape_like.dtype))
    targets = preset.spec.targets(preset.config, batch, seq_len, gen)
    return (drawn[0] if len(drawn) == 1 else tuple(drawn)), targets


def input_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def map_inputs(inputs: Inputs, fn) -> Inputs:
    """``fn`` applied to every input tensor, keeping the one-tensor / tuple form."""
    return tuple(fn(t) for t in inputs) if isinstance(inputs, tuple) else fn(inputs)


def micro_batches(inputs: Inputs, m: int) -> list[tuple[torch.Tensor, ...]]:
    """``m`` micro-batches (row chunks), each a tuple with one tensor per model input."""
    return list(zip(*(t.chunk(m) for t in input_tuple(inputs))))


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
        return map_inputs(inputs, lambda t: t[self.rows]), targets[self.rows]


def check_local_batch(batch: object, plan: Plan, num_inputs: int = 1) -> tuple[Inputs, torch.Tensor]:
    """A user batch must be ``(inputs, targets)`` with this dp rank's number of samples.

    ``inputs`` is a tensor (or a tuple of one) for a model with one input, else a tuple of ``num_inputs``."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise RunCheckError(f"dataloader: yielded {type(batch).__name__}; yield (inputs, targets) tuples")
    inputs, targets = batch
    given = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if len(given) != num_inputs:
        form = "a tensor" if num_inputs == 1 else f"a tuple of {num_inputs} tensors, in the forward's argument order"
        raise RunCheckError(f"dataloader: inputs has {len(given)} tensors; the planned model {plan.model.name} takes "
                            f"{num_inputs}: yield (inputs, targets) with inputs {form}")
    rows = plan.parallel.micro_batch_size * plan.parallel.num_micro_batches
    named = [(f"inputs[{i}]" if num_inputs > 1 else "inputs", t) for i, t in enumerate(given)]
    for name, t in (*named, ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != rows:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise RunCheckError(
                f"dataloader: {name} has shape {got}; each dp rank takes micro_batch_size x num_micro_batches = "
                f"{plan.parallel.micro_batch_size} x {plan.parallel.num_micro_batches} = {rows} samples per step")
    return (given[0] if num_inputs == 1 else given), targets


def as_iterator(data: Iterable | None, default: SyntheticData) -> Iterator:
    return iter(data) if data is not None else default
