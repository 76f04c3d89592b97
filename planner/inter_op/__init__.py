"""Layer-to-device: contiguous pipeline stages, solved exactly."""

from planner.inter_op.chain import Partition, StageCosts, brute_force, partition_dp, uniform_partition

__all__ = ["Partition", "StageCosts", "brute_force", "partition_dp", "uniform_partition"]
