"""Layer-to-device: contiguous pipeline stages, their sub-meshes and replication, solved exactly.

* :func:`solve_stages` / :func:`baselines` (:mod:`planner.inter_op.solve`): the entry points.
* :mod:`~planner.inter_op.problem`: the model and its objective; :mod:`~planner.inter_op.dp` and
  :mod:`~planner.inter_op.ilp`: the two exact methods; :mod:`~planner.inter_op.brute`: the oracle.
* :mod:`~planner.inter_op.chain`: the single-sub-mesh chain partition the joint search calls.
"""

from planner.inter_op.chain import Partition, StageCosts, brute_force, partition_dp, uniform_partition
from planner.inter_op.problem import StageProblem, SubMesh, build_problem
from planner.inter_op.solution import StageAssignment, StageSolution
from planner.inter_op.solve import METHODS, baselines, solve_stages

__all__ = [
    "METHODS",
    "Partition",
    "StageAssignment",
    "StageCosts",
    "StageProblem",
    "StageSolution",
    "SubMesh",
    "baselines",
    "brute_force",
    "build_problem",
    "partition_dp",
    "solve_stages",
    "uniform_partition",
]
