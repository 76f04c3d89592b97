"""profile-cluster: 2 gloo processes measure and write a cluster file the planner loads and plans on."""

from __future__ import annotations

import json

import pytest

from planner import plan
from planner.cluster import ClusterSpec
from runtime.cli import main
from runtime.profile_cluster import ProfileOptions, bus_bandwidth, message_sizes, node_counts, run


def test_sizes_node_counts_and_bus_bandwidth_conventions():
    assert message_sizes(4096, 65536) == [4096, 16384, 65536]
    assert message_sizes(4096, 100000) == [4096, 16384, 65536, 100000]
    assert node_counts(1) == [1] and node_counts(6) == [1, 2, 4, 6]
    # nccl-tests: busbw = algbw x 2(n-1)/n (all-reduce), x (n-1)/n (gather, scatter, all-to-all), x 1 (sendrecv)
    assert bus_bandwidth("all_reduce", 8e9, 8, 1.0) == 8e9 * 2 * 7 / 8
    assert bus_bandwidth("all_gather", 8e9, 8, 2.0) == 4e9 * 7 / 8
    assert bus_bandwidth("send_recv", 8e9, 8, 2.0) == 4e9


def test_an_existing_output_is_refused_without_force(tmp_path, capsys):
    out = tmp_path / "c.json"
    out.write_text("{}")
    assert main(["profile-cluster", "-o", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_two_gloo_processes_write_a_cluster_the_planner_plans_on(tmp_path):
    out = tmp_path / "measured.json"
    opts = ProfileOptions(output=str(out), base="cpu-local", max_bytes=65536, iterations=2, verbose=False)
    assert run(opts, 2) == 0
    raw = json.loads(out.read_text())
    spec = ClusterSpec.from_json(out)
    assert (spec.nodes, spec.devices_per_node) == (1, 2)
    measured = spec.groups[0].collectives
    for name in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv"):
        points = measured.points(name)
        assert [p.message_bytes for p in points] == [4096, 16384, 65536]
        assert all(p.nodes == 1 and p.bus_bandwidth_bytes_per_s > 0 for p in points)
    assert len(spec.groups[0].gemm) == 8 and all(g.dtype == "fp32" for g in spec.groups[0].gemm)
    fastest = max(g.flops_per_s for g in spec.groups[0].gemm)
    assert spec.device.peak("fp32") == max(fastest, ClusterSpec.preset("cpu-local").device.peak("fp32"))
    assert "memory" not in raw  # the CPU has no device memory to measure
    result = plan("gpt-tiny", spec, global_batch=8, baselines=False)
    assert result.cluster_fingerprint == spec.fingerprint()
    assert result.parallel.world_size == 2
    assert result.cluster == spec and ClusterSpec.from_dict(result.cluster) == spec
