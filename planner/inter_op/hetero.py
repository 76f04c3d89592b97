"""The joint search's stage split on a mixed cluster: the stage DP with the rank layout's device types.

The search fixes ``(dp, tp, pp)``, so every pipeline position holds ``dp·tp`` ranks,
``[k·dp·tp, (k+1)·dp·tp)`` for position ``k`` (``rank = (pp_index·dp + dp_index)·tp + tp_index``,
the layout the runtime executes; ranks go node group by node group). Which device type runs
position ``k`` is therefore fixed by the cluster's group order. This module hands that
configuration to the exact stage DP of :mod:`planner.inter_op.dp` as a :class:`StageProblem` with
``num_stages = pp``, ``stage_devices = dp·tp``, a pipeline micro-batch of ``dp × micro_batch_size``
samples (each of the ``dp`` replicas of a stage takes ``micro_batch_size``, as in the search) and
``stage_groups`` = the node group of every position. The DP then prices each position's layers
with its own device's speed and memory, and minimises the step time of
:mod:`planner.inter_op.problem` over the cuts.

Not handed over (``None``; the search keeps its single-device split, which
:func:`planner.cost.model.evaluate` still prices per device type):

* a position whose ranks straddle two node groups (its dp replicas would mix device types);
* schedules the stage DP does not model (more than one chunk per device);
* a position size that is neither a power-of-two slice of a node nor whole nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from planner.cluster import ClusterSpec
from planner.cost.constants import CostConstants
from planner.cost.layer_table import LayerTable
from planner.errors import SpecError
from planner.inter_op.chain import Partition
from planner.inter_op.dp import solve_dp
from planner.inter_op.problem import SUPPORTED_SCHEDULES, StageProblem, build_problem
from planner.plan import ParallelConfig
from planner.trace.graph import CostGraph


def position_group_indices(cluster: ClusterSpec, cfg: ParallelConfig) -> tuple[int, ...] | None:
    """Node group of each pipeline position of ``cfg``, or None when some position straddles groups."""
    spans = cluster.position_groups(cfg.pp, cfg.dp * cfg.tp)
    if any(len(span) != 1 for span in spans):
        return None
    return tuple(span[0] for span in spans)


def hetero_problem(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants,
                   group_table: Callable[[int, int], LayerTable] | None = None) -> StageProblem | None:
    """The stage problem of ``cfg`` on ``cluster`` with every position's device type fixed, or None
    when the configuration is outside what the stage DP models (module docstring). ``group_table``:
    as :func:`planner.inter_op.problem.build_problem` takes it."""
    if cfg.virtual_stages != 1 or cfg.schedule not in SUPPORTED_SCHEDULES or cfg.zero_stage > 1:
        return None
    groups = position_group_indices(cluster, cfg)
    if groups is None:
        return None
    try:
        return build_problem(graph, cluster, schedule=cfg.schedule, num_micro_batches=cfg.num_micro_batches,
                             micro_batch=cfg.micro_batch_size * cfg.dp, tp=cfg.tp, num_stages=cfg.pp,
                             sequence_parallel=cfg.sequence_parallel, recompute=cfg.recompute,
                             zero_stage=cfg.zero_stage, stage_devices=cfg.dp * cfg.tp, constants=c,
                             stage_groups=groups, group_table=group_table)
    except SpecError:  # no sub-mesh of dp·tp devices (e.g. 6 devices of an 8-device node)
        return None


def hetero_partition(graph: CostGraph, cluster: ClusterSpec, cfg: ParallelConfig, c: CostConstants,
                     group_table: Callable[[int, int], LayerTable] | None = None) -> Partition | None:
    """Stage boundaries of ``cfg`` (pipeline positions in order) from the exact stage DP, each
    position priced on its own device type; None when the DP cannot model ``cfg``."""
    pr = hetero_problem(graph, cluster, cfg, c, group_table)
    if pr is None:
        return None
    res = solve_dp(pr)
    if not res.cost.feasible:
        return Partition((), math.inf, "infeasible")
    per_position = cfg.dp * cfg.tp
    assert all(r[0] == k * per_position for k, r in enumerate(res.cost.ranks)), res.cost.ranks  # the runtime's layout
    return Partition(tuple((i, j) for i, j, _ in res.stages), max(res.cost.stage_time_s), "optimal")
