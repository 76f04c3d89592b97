"""Shared fixtures: the A100 node, GPT-3-sized graphs and traces (traced once per session)."""

from __future__ import annotations

import pytest

from planner.cluster import ClusterSpec
from planner.intra_op import MeshSpec


@pytest.fixture(scope="session")
def node() -> ClusterSpec:
    return ClusterSpec.preset("dgx-a100-80g")


@pytest.fixture(scope="session")
def device(node):
    return node.device


@pytest.fixture(scope="session")
def mesh_of(node):
    """``mesh_of(tp=8)`` or ``mesh_of(dp=2, tp=4)``: a mesh on the A100 node, axes in the given order."""
    def make(**axes: int) -> MeshSpec:
        return MeshSpec.from_cluster(node, axes)
    return make


def _trace_gpt(num_layers: int):
    from planner.models import load_preset
    from planner.models.gpt import GPT, GPTConfig
    from planner.trace import trace_model

    preset = load_preset("gpt3-175b")
    cfg = dict(preset.config, num_layers=num_layers)
    import torch

    with torch.device("meta"):
        model = GPT(GPTConfig(**cfg))
    return trace_model(model, preset.sample_input(1), name=f"gpt3-175b-{num_layers}l")


@pytest.fixture(scope="session")
def gpt3_2layer():
    """GPT-3 175B sizes, two blocks: embed, blocks.0, blocks.1, head."""
    return _trace_gpt(2)


@pytest.fixture(scope="session")
def gpt3_full():
    """The whole GPT-3 175B (96 blocks) traced on meta at batch 1: about 5 s, shared with other suites."""
    from tests_helpers import traced

    return traced("gpt3-175b")


@pytest.fixture(scope="session")
def gpt_tiny():
    from planner.models import load_preset
    from planner.trace import trace_model

    preset = load_preset("gpt-tiny")
    return trace_model(preset.build(), preset.sample_input(2), name="gpt-tiny")
