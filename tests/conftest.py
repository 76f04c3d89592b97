"""Shared fixtures. tests/ goes on sys.path so tests can `import tests_helpers`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tests_helpers import traced  # noqa: E402


@pytest.fixture(scope="session")
def gpt_tiny_graph():
    return traced("gpt-tiny")
