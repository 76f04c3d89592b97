"""Chimera (Li & Hoefler, SC'21): two pipelines over two replicas of the model, in opposite directions.

Replica 0 (the *down* pipeline) puts stage ``k`` on device ``k``; replica 1 (the *up* pipeline) puts
stage ``k`` on device ``p - 1 - k``. Every device therefore holds two stages (``d`` and ``p - 1 - d``),
twice the weights of 1F1B, and the two replicas' gradients are all-reduced before the (synchronous)
optimizer step. Micro-batches come in units of ``p``: the first ``p / 2`` of a unit go down, the other
``p / 2`` go up, and each pipeline's work fills the other's fill-and-drain bubbles.

The order is derived by :func:`.listsched.list_schedule` (forward = fused backward = 1 unit) with the
rule: a ready backward first, else a ready forward; ties go to the earlier unit, then to the
micro-batch that is earlier within its own pipeline, then to the one with more stages still ahead of
it. With equal forward and backward times this reproduces the paper's bubble ratio
``(p - 2) / (2m + p - 2)`` exactly for ``m = p, 2p, 3p, ...`` (``tests/schedules``), and device 0
holds ``p / 2 + 1 + min(d, p - 1 - d)`` micro-batches for ``m = p`` (the paper's range is
``[p/2 + 1, p]``) and ``p`` once ``m >= 2p``, when the next unit's forwards fill the drain.
"""

from __future__ import annotations

from planner.schedules.actions import Action, Program
from planner.schedules.listsched import list_schedule


def placements(p: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(range(p)), tuple(p - 1 - k for k in range(p))


def replica_of(p: int, m: int) -> tuple[int, ...]:
    """Micro-batch ``j`` goes down (0) when it is in the first half of its unit of ``p``, else up (1)."""
    half = p // 2
    return tuple(0 if j % p < half else 1 for j in range(m))


def chimera(p: int, m: int) -> Program:
    down, up = placements(p)
    replicas = replica_of(p, m)
    half = p // 2
    work: list[list[Action]] = [[] for _ in range(p)]
    for j in range(m):
        placement = down if replicas[j] == 0 else up
        for k in range(p):
            work[placement[k]] += [Action(k, "F", j), Action(k, "B", j)]

    def rank(action: Action) -> tuple[int, int, int]:
        unit, within = divmod(action.microbatch, p)
        # Stages still ahead: forwards go up the stage numbers, backwards come down them.
        ahead = -action.stage if action.kind == "B" else action.stage
        return unit, within % half, ahead

    def choose(device: int, ready: list[Action], history: list[Action]) -> Action | None:
        backwards = [a for a in ready if a.kind == "B"]
        return min(backwards or ready, key=rank)

    # The paper's bubble formula assumes a backward as long as a forward: derive the order that way.
    return list_schedule((down, up), replicas, m, work, choose, {"F": 1, "I": 1, "W": 1, "B": 1})
