"""Automatic partition planner: trace a model, price configurations, solve, write a plan.

Public API::

    from planner import plan, evaluate, ClusterSpec, Plan, ParallelConfig
"""

__version__ = "0.1.0"

# Bound after the submodule `planner.plan` has loaded, so the name `planner.plan` is the function.
from planner.api import evaluate, plan  # noqa: E402
from planner.cluster import ClusterSpec, DeviceSpec, LinkSpec, NodeGroup  # noqa: E402
from planner.plan import ParallelConfig, Plan  # noqa: E402  (loads the submodule planner.plan first)

__all__ = ["ClusterSpec", "DeviceSpec", "LinkSpec", "NodeGroup", "ParallelConfig", "Plan", "evaluate", "plan",
           "__version__"]
