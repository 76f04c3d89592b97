"""Infeasibility hints are true: the suggested node count fits and the count below does not (found by
search, planner/hints.py), shortfalls never read "0.0 GiB", and a layer no device holds is named."""

from __future__ import annotations

import re

import pytest

from planner import ClusterSpec
from planner.api import plan
from planner.cluster import DeviceSpec, LinkSpec
from planner.cost.constants import CostConstants
from planner.errors import InfeasibleError
from planner.explain import _device_size, amount
from planner.hints import fits_somewhere, nodes_that_fit
from planner.pricing import Pricer
from planner.resolve import resolve_model
from planner.space import SearchSpace

MiB, GiB = 2**20, 2**30
C = CostConstants(reserved_bytes=0, allocator_usable_fraction=1.0)  # usable memory = the device's


def _cluster(memory_bytes: int, nodes: int = 1) -> ClusterSpec:
    # built directly (not from a file): the device is deliberately far below the plausible ranges
    return ClusterSpec.homogeneous(
        name="small", nodes=nodes, devices_per_node=2,
        device=DeviceSpec(name="small-dev", peak_flops={"fp32": 1e12}, memory_bytes=memory_bytes,
                          memory_bandwidth_bytes_per_s=1e11),
        intra_node=LinkSpec(kind="nvlink", bandwidth_bytes_per_s=1e10, latency_s=5e-6),
        inter_node=LinkSpec(kind="ethernet", bandwidth_bytes_per_s=1e9, latency_s=1e-5))


@pytest.fixture(scope="module")
def graph():
    return resolve_model("gpt-10m", dtype="fp32").graph


def _fits(graph, nodes: int, memory_bytes: int) -> bool:
    try:
        plan("gpt-10m", _cluster(memory_bytes, nodes), global_batch=8, constants=C, dtype="fp32", baselines=False)
    except InfeasibleError:
        return False
    return True


def test_suggested_count_fits_and_the_one_below_does_not(graph):
    memory = 40 * MiB
    assert not _fits(graph, 1, memory)
    with pytest.raises(InfeasibleError) as err:
        plan("gpt-10m", _cluster(memory), global_batch=8, constants=C, dtype="fp32", baselines=False)
    text = str(err.value)
    suggested = int(re.search(r"--nodes (\d+)", text).group(1))
    assert re.search(rf"found by search: {suggested - 1} nodes? do(es)? not fit", text), text
    assert suggested >= 2
    assert _fits(graph, suggested, memory), text  # the planner itself finds a plan there
    assert not _fits(graph, suggested - 1, memory), text  # and none one node below
    assert " 0.0 GiB over" not in text and "--nodes -" not in text


def test_probe_agrees_with_the_full_search(graph):
    hint = nodes_that_fit(graph, _cluster(40 * MiB), 8, C, SearchSpace())
    assert hint is not None and hint.complete and hint.fails_at == hint.fits_at - 1
    for n, expect in ((hint.fits_at, True), (hint.fails_at, False)):
        assert fits_somewhere(Pricer(graph, _cluster(40 * MiB, n), C), 8, SearchSpace(recompute=("full",),
                                                                                       micro_batch_size=(1,))) is expect


def test_no_count_fits_a_layer_says_so(graph):
    with pytest.raises(InfeasibleError) as err:
        plan("gpt-10m", _cluster(2 * MiB), global_batch=8, constants=C, dtype="fp32", baselines=False)
    text = str(err.value)
    assert "one layer needs" in text and "use devices with >=" in text, text
    assert "--nodes" not in text


def test_device_without_usable_memory_is_named(graph):
    c = CostConstants()  # 2 GiB reserved: a 40-byte device has none left
    with pytest.raises(InfeasibleError) as err:
        plan("gpt-10m", _cluster(40), global_batch=8, constants=c, dtype="fp32", baselines=False)
    text = str(err.value)
    assert "device.memory_bytes = 40" in text and "nothing usable" in text and "--nodes" not in text


@pytest.mark.parametrize("nbytes, shown", [(5, "5 bytes (just over)"), (30 * MiB, "30.0 MiB"),
                                           (int(0.04 * GiB), "41.0 MiB"), (int(1.26 * GiB), "1.3 GiB")])
def test_shortfall_never_reads_zero(nbytes, shown):
    assert amount(nbytes) == shown


def test_device_size_is_above_the_one_in_hand():
    have = 32 * GiB
    assert _device_size(have + 1000, have) == "32.1 GiB"  # not "32 GiB" on 32 GiB devices
    assert _device_size(40.01 * GiB, have) == "40.1 GiB"
