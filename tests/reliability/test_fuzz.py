"""Property: on random clusters, random layer costs and random memory limits the planner either
returns a plan that satisfies every memory limit under its own cost model, or raises a
PlannerError that explains why; never an exception of another kind."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from planner import ClusterSpec, plan
from planner.cluster import DeviceSpec, LinkSpec
from planner.cost.constants import CostConstants
from planner.errors import InfeasibleError, PlannerError

GiB = 2**30


class RandomChain(nn.Module):
    """A chain of linear layers of random widths: random per-layer FLOPs, params and activations."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Sequential(nn.Linear(a, b), nn.GELU()) for a, b in zip(widths, widths[1:])])

    def forward(self, x):
        return self.layers(x)


clusters = st.builds(
    lambda mem_gib, tflops, bw, lat, nodes, dpn: ClusterSpec.homogeneous(
        name="fuzz",
        device=DeviceSpec(name="fuzz-gpu", peak_flops={"bf16": tflops * 1e12}, memory_bytes=int(mem_gib * GiB),
                          memory_bandwidth_bytes_per_s=1e12),
        nodes=nodes, devices_per_node=dpn,
        intra_node=LinkSpec(kind="nvlink", bandwidth_bytes_per_s=bw * 1e9, latency_s=lat),
        inter_node=LinkSpec(kind="infiniband", bandwidth_bytes_per_s=bw * 1e8, latency_s=lat * 2)),
    mem_gib=st.floats(2.05, 12.0), tflops=st.floats(1.0, 1000.0), bw=st.floats(1.0, 900.0),
    lat=st.floats(0.0, 1e-4), nodes=st.integers(1, 3), dpn=st.sampled_from([1, 2, 4, 8]),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster=clusters, widths=st.lists(st.sampled_from([64, 512, 2048, 8192, 16384]), min_size=2, max_size=7),
       seq=st.sampled_from([1, 16, 512]), batch_exp=st.integers(0, 6))
def test_plan_fits_or_explains(cluster, widths, seq, batch_exp):
    with torch.device("meta"):
        model = RandomChain(widths)
    global_batch = 2**batch_exp
    try:
        p = plan(model, cluster, global_batch=global_batch, sample_input=torch.zeros(1, seq, widths[0]))
    except InfeasibleError as exc:
        event("infeasible, explained")
        # what overflows, in GiB, or (the state fits) which knobs leave no valid configuration
        assert "GiB" in str(exc) or "no (dp, tp, pp, micro-batch, schedule)" in str(exc)
        return
    except PlannerError as exc:
        event("rejected input, explained")
        assert str(exc)
        return
    event("plan returned")
    c = CostConstants()
    usable = cluster.device.memory_bytes * c.allocator_usable_fraction - c.reserved_bytes
    assert p.predicted.fits
    assert max(p.predicted.memory_per_device_bytes) <= usable
    assert p.parallel.world_size == cluster.num_devices
    assert p.parallel.global_batch == global_batch
    covered = [i for s in p.stages for i in range(s.layer_start, s.layer_stop)]
    assert sorted(covered) == list(range(p.model.num_layers))
