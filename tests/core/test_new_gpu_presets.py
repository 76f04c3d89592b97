"""The published runs on H200, GB200 and GB300 are priced on the presets of those GPUs (they were skipped,
"no cluster preset for this GPU", before dgx-h200, gb200-nvl72 and gb300-nvl72 existed)."""

from __future__ import annotations

import re

import pytest

from planner import ClusterSpec
from planner.validation.cases import _GPU_PRESETS, published_cases

# run id -> (preset, nodes, devices per node): an NVL72 node is the NVLink domain, the largest divisor
# of the run's GPU count up to 72
RUNS = {
    "torchtitan-2506-trainy-llama31-8b-h200-g32": ("dgx-h200", 4, 8),
    "torchtitan-2506-trainy-llama31-8b-h200-g64": ("dgx-h200", 8, 8),
    "mbridge-25.09-dgx-gb200-llama3-70b-g64-fsdp64": ("gb200-nvl72", 1, 64),
    "mbridge-25.09-dgx-gb200-llama31-405b-g128-fsdp64": ("gb200-nvl72", 2, 64),
    "mbridge-25.11-dgx-gb300-llama3-70b-g64-fsdp64": ("gb300-nvl72", 1, 64),
    "mbridge-25.11-dgx-gb200-llama3-70b-g64-fsdp64": ("gb200-nvl72", 1, 64),
    "mbridge-26.04.01-dgx-gb300-llama3-70b-g64-fsdp64": ("gb300-nvl72", 1, 64),
    "mbridge-26.04.01-dgx-gb200-llama3-70b-g64-fsdp64": ("gb200-nvl72", 1, 64),
}


@pytest.fixture(scope="module")
def published():
    return published_cases()


def test_no_published_run_is_skipped_for_want_of_a_preset(published):
    assert not [s for s in published.skipped if "no cluster preset" in s.reason]
    assert not {s.case_id for s in published.skipped} & set(RUNS)


@pytest.mark.parametrize("case_id", sorted(RUNS))
def test_run_maps_to_its_preset_and_node_size(published, case_id):
    (case,) = [c for c in published.cases if c.case_id == case_id]
    preset, nodes, per_node = RUNS[case_id]
    assert (case.cluster.preset, case.cluster.nodes, case.cluster.devices_per_node) == (preset, nodes, per_node)
    assert case.cluster.memory_gib is None  # the stated memory (H200: 141 GB) is the preset's
    if preset.endswith("-nvl72"):
        assert any("NVLink domain(s) of 64" in a for a in case.approximations)
    else:
        assert not any("NVLink domain" in a for a in case.approximations)
    if case_id.startswith("mbridge"):  # Transformer Engine: cuDNN attention, which the preset states
        assert case.trainer == "megatron"
        assert any("cuDNN fused attention" in a and "GB" in a for a in case.approximations)
        assert ClusterSpec.preset(preset).device.attention_efficiency("cudnn") is not None
    ClusterSpec.preset(preset).resized(nodes=nodes, devices_per_node=per_node)  # a plausible cluster


@pytest.mark.parametrize("gpu, preset", [("NVIDIA H200", "dgx-h200"), ("NVIDIA B200", "dgx-b200"),
                                         ("NVIDIA GB200", "gb200-nvl72"), ("NVIDIA GB300", "gb300-nvl72"),
                                         ("NVIDIA H100 80GB HBM3", "dgx-h100")])
def test_gpu_names_pick_the_most_specific_preset(gpu, preset):
    """A run's ``cluster.gpu`` (the validator) and torch's device name (profile-cluster's --base default):
    the first match wins, so GB200 must not read as B200."""
    from runtime.profile_cluster import GPU_PRESETS

    assert next(name for pattern, name in _GPU_PRESETS if re.search(pattern, gpu)) == preset
    assert next(name for marker, name in GPU_PRESETS if marker in gpu) == preset
    assert preset in ClusterSpec.presets()
