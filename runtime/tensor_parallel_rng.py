"""Dropout under tensor parallelism: one mask where tp ranks hold the same values, independent ones where they differ.

Megatron-LM's rule (Shoeybi et al. 2019, section 3; its ``CudaRNGStatesTracker``), on torch's own
generators:

* **Replicated regions** (the residual stream after a row-parallel all-reduce, embeddings): every tp
  rank holds the same tensor and must drop the same elements, or the replicas drift apart and the
  next all-reduce sums inconsistent values. These dropouts draw from the default generators, which
  the runtime keeps in lockstep across tp ranks: every rank seeds them alike before building the
  model (``runtime.model.build_model``), and every rank draws the same amounts in the same order
  (the split regions below draw as much on each rank, from a fork).
* **Split regions** (a rank's own attention heads, its slice of a feed-forward between a column- and
  its row-parallel partner, its sequence shard under sequence parallelism): each rank holds
  different values, so it needs its own mask. A :class:`SplitRegionRNG` draws one 62-bit number from
  the default CPU generator (the same on every tp rank, so the lockstep holds), mixes in the tp rank,
  and runs the dropout under ``torch.random.fork_rng`` seeded with that: the rank's stream, while the
  default generators come back to where they were.

Activation recomputation replays the masks: ``torch.utils.checkpoint`` restores the default
generators before recomputing, so the draw, and with it the fork's seed, repeat. Data-parallel
replicas draw the same masks (as Megatron's default, without ``--data-parallel-random-init``); they
see different rows, so the masks fall on different samples. With one process the masks differ from
these (the ranks draw differently), so dropout runs are checked for consistency across tp ranks,
not against one process (tests/runtime/test_runtime_dropout_tp.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive tp ranks far apart
_MASK = (1 << 63) - 1


class SplitRegionRNG:
    """The random stream of tp rank ``tp_rank`` for dropouts on values only this rank holds."""

    def __init__(self, tp_rank: int) -> None:
        self.tp_rank = tp_rank

    @contextlib.contextmanager
    def fork(self, device: torch.device) -> Iterator[None]:
        """Run the body on this rank's stream; the default generators advance by one draw, alike on every rank."""
        base = int(torch.randint(0, 1 << 62, (1,)).item())  # default CPU generator: lockstep across tp ranks
        seed = (base ^ ((self.tp_rank + 1) * _MIX)) & _MASK
        cuda = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            yield


def fork_dropout(module: nn.Dropout, rng: SplitRegionRNG) -> None:
    """Make ``module`` (a dropout on a split region) draw its mask from ``rng``'s stream, in place."""
    _fork_forward(module, rng, lambda: module.training and module.p > 0)


def fork_module(module: nn.Module, rng: SplitRegionRNG) -> None:
    """Run all of ``module``'s forward on ``rng``'s stream (an attention on this rank's heads: its only random
    op, the dropout on the attention probabilities, fused or not, acts on values only this rank holds)."""
    _fork_forward(module, rng, lambda: module.training)


def _fork_forward(module: nn.Module, rng: SplitRegionRNG, drops) -> None:
    """Wrap ``module.forward`` so that it runs on ``rng``'s stream whenever ``drops()`` (once per module)."""
    if getattr(module, "_split_region_rng", None) is not None:
        return
    plain = module.forward

    def forward(*args, **kwargs):
        if not drops():
            return plain(*args, **kwargs)
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
                      torch.device("cpu"))
        with rng.fork(device):
            return plain(*args, **kwargs)

    module.forward = forward
    module._split_region_rng = rng


def has_dropout(module: nn.Module) -> bool:
    """Whether anything in ``module`` drops values while training (a ``Dropout`` or a fused attention's ``dropout``)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return True
        if isinstance(getattr(m, "dropout", None), float) and m.dropout > 0:
            return True
    return False


def replica_divergence(modules: list[nn.Module], tp_group) -> float:
    """Largest difference between this rank's copy of a tp-replicated parameter and tp rank 0's (collective over tp).

    Every parameter not split on tp (a plain tensor, or a DTensor placed ``Replicate`` on every mesh
    dim) must stay identical across the tp group; a dropout that drew different masks where the
    ranks hold the same values would make the copies drift apart. Each copy is compared with the
    one tp rank 0 broadcasts, and the maximum over the group is returned (0.0: consistent).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    worst = torch.zeros((), dtype=torch.float64)
    for module in modules:
        for _, param in sorted(module.named_parameters(), key=lambda item: item[0]):
            if isinstance(param, DTensor):
                if not all(p.is_replicate() for p in param.placements):
                    continue
                local = param._local_tensor.detach()
            else:
                local = param.detach()
            reference = local.clone()
            dist.broadcast(reference, group=tp_group, group_src=0)
            worst = torch.maximum(worst, (local - reference).abs().max().double().cpu())
    worst = worst.to(_device_of(modules))
    dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=tp_group)
    return float(worst)


def _device_of(modules: list[nn.Module]) -> torch.device:
    for module in modules:
        for param in module.parameters():
            return param.device
    return torch.device("cpu")
