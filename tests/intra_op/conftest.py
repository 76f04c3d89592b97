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


def _trace(preset_name: str, num_layers: int):
    """A preset with fewer layers, built and traced on meta at batch 1."""
    import torch

    from planner.models import FAMILIES, load_preset
    from planner.trace import trace_model

    preset = load_preset(preset_name)
    family = FAMILIES[preset.family]
    cfg = dict(preset.config, num_layers=num_layers)
    with torch.device("meta"):
        model = family.build(cfg)
    return trace_model(model, family.sample_input(cfg, 1, None, "meta"), name=f"{preset_name}-{num_layers}l")


@pytest.fixture(scope="session")
def gpt3_2layer():
    """GPT-3 175B sizes, two blocks: embed, blocks.0, blocks.1, head."""
    return _trace("gpt3-175b", 2)


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


@pytest.fixture(scope="session")
def llama_2layer():
    """LLaMA-2 7B sizes, two blocks: RMSNorm written out, RoPE, SwiGLU."""
    return _trace("llama2-7b", 2)


@pytest.fixture(scope="session")
def mixtral_2layer():
    """Mixtral 8x7B sizes, two blocks: 8 stacked SwiGLU experts, top-2 routing."""
    return _trace("mixtral-8x7b", 2)
