"""Automatic partition planner: trace a model, price configurations, solve, write a plan.

Public API::

    from planner import plan, evaluate, ClusterSpec, Plan, ParallelConfig
"""

__version__ = "0.1.0"

from planner.cluster import ClusterSpec, DeviceSpec, LinkSpec, NodeGroup  # noqa: E402
from planner.plan import ParallelConfig, Plan  # noqa: E402


def __getattr__(name: str):
    # plan/evaluate import torch; keep `import planner` light for the CLI's --help.
    if name in ("plan", "evaluate"):
        from planner import api

        return getattr(api, name)
    raise AttributeError(name)


__all__ = ["ClusterSpec", "DeviceSpec", "LinkSpec", "NodeGroup", "ParallelConfig", "Plan", "evaluate", "plan",
           "__version__"]
