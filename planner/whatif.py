"""What-if analysis on a plan file: change the cluster or the batch, re-plan without retracing.

``--what-if inter_node_bandwidth=2x`` scales a quantity; ``--what-if nodes=16`` sets one. The
plan's stored layer-level cost graph (``Plan.graph``) is re-used, so no model code runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from planner.cluster import ClusterSpec, NodeGroup
from planner.errors import SpecError
from planner.graph_io import graph_from_dict
from planner.plan import Plan

KNOBS = {
    "inter_node_bandwidth": "network bandwidth per node (e.g. 2x, or bytes/s)",
    "intra_node_bandwidth": "NVLink/intra-node bandwidth per device (e.g. 0.5x, or bytes/s)",
    "nodes": "number of nodes (an integer, or 2x)",
    "devices_per_node": "devices per node (an integer)",
    "memory": "device memory (e.g. 2x, or bytes)",
    "peak_flops": "device peak FLOP/s for every dtype (e.g. 1.5x)",
    "global_batch": "samples per step (an integer, or 2x)",
}


COUNTS = ("nodes", "devices_per_node", "global_batch")  # knobs whose value is a whole number
MAX_COUNT = 10**9


@dataclass(frozen=True)
class WhatIf:
    knob: str
    factor: float | None
    value: float | None

    def apply(self, current: float) -> float:
        return current * self.factor if self.factor is not None else float(self.value)


def parse(text: str) -> WhatIf:
    if "=" not in text:
        raise SpecError("--what-if", text, f"write KNOB=VALUE, e.g. nodes=16 or inter_node_bandwidth=2x; knobs: "
                        f"{', '.join(KNOBS)}")
    knob, raw = (part.strip() for part in text.split("=", 1))
    if knob not in KNOBS:
        from planner.cluster import _edit_distance

        close = min(KNOBS, key=lambda k: _edit_distance(k, knob))
        raise SpecError("--what-if", knob, f"unknown knob; did you mean '{close}'? knobs: {', '.join(KNOBS)}")
    is_factor = raw.lower().endswith("x")
    try:
        number = float(raw[:-1] if is_factor else raw)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise SpecError("--what-if", text, f"the value must be a positive number or a factor like 2x "
                        f"({knob}: {KNOBS[knob]})")
    if knob in COUNTS and not is_factor and (number != int(number) or number > MAX_COUNT):
        raise SpecError("--what-if", text, f"{knob} is a count: give a whole number up to {MAX_COUNT:,}, or a "
                        "factor like 2x")
    return WhatIf(knob, number, None) if is_factor else WhatIf(knob, None, number)


def _scale_groups(cluster: ClusterSpec, w: WhatIf) -> ClusterSpec:
    groups: list[NodeGroup] = []
    for g in cluster.groups:
        if w.knob == "inter_node_bandwidth":
            g = replace(g, inter_node=replace(g.inter_node, bandwidth_bytes_per_s=w.apply(
                g.inter_node.bandwidth_bytes_per_s)))
        elif w.knob == "intra_node_bandwidth":
            g = replace(g, intra_node=replace(g.intra_node, bandwidth_bytes_per_s=w.apply(
                g.intra_node.bandwidth_bytes_per_s)))
        elif w.knob == "memory":
            g = replace(g, device=replace(g.device, memory_bytes=int(w.apply(g.device.memory_bytes))))
        elif w.knob == "peak_flops":
            g = replace(g, device=replace(g.device, peak_flops={k: w.apply(v) for k, v in g.device.peak_flops.items()}))
        groups.append(g)
    return replace(cluster, groups=tuple(groups))


def apply(plan: Plan, changes: list[WhatIf]) -> tuple[ClusterSpec, int]:
    """The modified cluster and global batch."""
    cluster = plan.cluster
    batch = plan.model.global_batch
    for w in changes:
        if w.knob == "nodes":
            cluster = cluster.resized(nodes=max(1, round(w.apply(cluster.nodes))))
        elif w.knob == "devices_per_node":
            cluster = cluster.resized(devices_per_node=max(1, round(w.apply(cluster.devices_per_node))))
        elif w.knob == "global_batch":
            batch = max(1, round(w.apply(batch)))
        else:
            cluster = _scale_groups(cluster, w)
    return cluster, batch


def replan(plan: Plan, changes: list[WhatIf], **kwargs: Any) -> Plan:
    from planner.api import ResolvedModel, plan_resolved
    from planner.models import load_preset

    if not plan.graph:
        raise SpecError("plan", plan.model.name, "this plan file has no stored cost graph (written by an older "
                        "planner); re-create it with `python -m planner plan` to use --what-if")
    cluster, batch = apply(plan, changes)
    preset = load_preset(plan.model.preset) if plan.model.preset else None
    resolved = ResolvedModel(module=None, preset=preset, graph=graph_from_dict(plan.graph),
                             sample_spec=plan.model.sample_input)
    return plan_resolved(resolved, cluster, global_batch=batch, **kwargs)
