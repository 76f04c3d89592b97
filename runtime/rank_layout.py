"""The typed boundary the runtime reads from a plan: where each rank sits, and how tensors are split.

Both live in the planner, next to the plan they describe, so that the planner, the cost model and
the runtime share one definition; this module re-exports them under the names the runtime uses:

* :class:`RankLayout` (:mod:`planner.layout`): the ``(pp, dp, cp, tp)`` degrees and the one rank formula
  of the plan contract, ``rank = ((pp_index * dp + dp_index) * cp + cp_index) * tp + tp_index``: a rank's
  coordinates and back, and the ranks of each axis group.
* :class:`TensorSplits` (:mod:`planner.plan_types`): the plan's tensor-parallel placements
  (``plan.placements``, format ``intra_op_sharding/1``: ``style`` = ``{module fqn: colwise | rowwise |
  vocab | sequence | replicate}``), checked when the plan is read; code asks
  ``TensorSplits.from_plan(plan).style_of(fqn)``.
"""

from __future__ import annotations

from planner.layout import Axis, RankCoords, RankLayout
from planner.plan_types import PLACEMENTS_SCHEMA, STYLES, Style, TensorSplits

__all__ = ["PLACEMENTS_SCHEMA", "STYLES", "Axis", "RankCoords", "RankLayout", "Style", "TensorSplits"]
