"""How much of a device's data-parallel gradient reduction its last backward hides.

Bucketed reducers (PyTorch DDP, Megatron-LM's ``--overlap-grad-reduce``, nanotron) launch a bucket's
collective once every gradient in it exists. The backward runs the layers in reverse, so gradients
appear one layer after another, and the network can only send what exists: the collectives trail
the backward, and what is still queued or not yet produced when the backward ends is exposed.

Two parts are never hidden, whatever the bandwidth:

* the gradients produced at the very end: the input embedding's (the first layer runs its backward
  last, and a tied embedding's gradient is complete only then). With a 128k vocabulary that is a
  fifth of a 1B Llama's parameters;
* the last bucket, launched when the backward ends (``CostConstants.grad_bucket_bytes``).

The model is a fluid queue: the collective moves the device's gradient bytes at the rate its priced
time implies (``bytes / comm_s``), gradients are released evenly over each layer's backward, and the
reduction finishes at ``max_t (t + bytes not yet sent at t / rate)``. With everything ready at the
start it is the old ``max(0, comm − backward)``; with nothing ready before the end it is ``comm``.
"""

from __future__ import annotations

import numpy as np

from planner.cost.comm import with_overlap_slowdown
from planner.cost.constants import CostConstants
from planner.cost.layer_table import LayerTable


def backward_release(table: LayerTable, chunks: list[tuple[int, int]], chunk_backward_s: list[float]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(seconds, parameters)`` per layer of ``chunks``, in the order the device's last backward runs
    them (the last chunk first, each chunk's layers in reverse).

    A chunk's backward seconds (``chunk_backward_s``, as the schedule priced them) are shared among its
    layers by their own backward work. A tied parameter the device holds but does not own (the head's
    copy of the embedding on the last stage) is released with its first user there.
    """
    seconds: list[np.ndarray] = []
    params: list[np.ndarray] = []
    seen: set[str] = set()
    work_all = table.backward_work_s()
    for (a, b), total in sorted(zip(chunks, chunk_backward_s), key=lambda x: -x[0][0]):
        work = work_all[a:b]
        share = work / work.sum() if work.sum() > 0 else np.full(b - a, 1.0 / (b - a))
        own = table.params[a:b].astype(float).copy()
        for i in range(a, b):
            for name, numel, owner in table.tied[i]:
                if not any(lo <= owner < hi for lo, hi in chunks) and name not in seen:
                    seen.add(name)
                    own[i - a] += numel
        seconds.append((total * share)[::-1])
        params.append(own[::-1])
    if not seconds:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(seconds), np.concatenate(params)


def exposed_reduce_s(comm_s: float, seconds: np.ndarray, params: np.ndarray, bucket_fraction: float,
                     c: CostConstants) -> float:
    """What ``comm_s`` of gradient reduction adds after a backward whose layers take ``seconds`` and
    release ``params`` gradients each (in backward order, :func:`backward_release`).

    ``bucket_fraction``: the last bucket's share of the reduced bytes (it leaves when the backward
    ends). The hidden part costs the compute ``overlap_compute_slowdown`` of its time; where the
    collectives share the compute's cores (``comm_compute_overlap`` < 1) at most that fraction of the
    backward hides anything.
    """
    if comm_s <= 0.0:
        return 0.0
    backward = float(seconds.sum())
    total = float(params.sum())
    if backward <= 0.0 or total <= 0.0:
        return comm_s
    # seconds to send the bytes still unsent, counted from each layer's start (nothing of it released yet)
    released_before = np.cumsum(params) - params
    starts = np.cumsum(seconds) - seconds
    finish = float(np.max(starts + comm_s * (1.0 - released_before / total)))
    finish = max(finish, backward + comm_s * min(1.0, bucket_fraction))
    exposed = max(finish - backward, comm_s - c.comm_compute_overlap * backward, 0.0)
    exposed = min(exposed, comm_s)
    return with_overlap_slowdown(exposed, comm_s - exposed, c)
