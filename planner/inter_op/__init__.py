"""Layer-to-device: the pipeline's contiguous stages, solved exactly.

* :mod:`~planner.inter_op.chain`: the stage solver (:func:`partition_dp`): ``S`` contiguous stages,
  each at its own pipeline position's speed and memory limit, minimising the synchronous step time
  ``(m-1)·max + Σ`` of the stage times; a homogeneous cluster is its one-row case.
  :func:`~planner.inter_op.chain.partition_unconstrained` is its time-only min-max split of one row
  (a binary search), used when there is no memory limit.
"""

from planner.inter_op.chain import Partition, StageCosts, partition_dp, uniform_partition

__all__ = ["Partition", "StageCosts", "partition_dp", "uniform_partition"]
