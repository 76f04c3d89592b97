"""Imports point one way (trace -> cost -> solvers -> search -> plan): no cycle, and cost calls no solver.

:func:`tools.import_graph.import_cycles` parses every module of ``planner/`` with ``ast`` and builds
the graph with networkx; a package importing its own submodules is not an edge.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOLVERS = ("planner.intra_op", "planner.inter_op", "planner.pricing", "planner.search")


def _tool():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "tools" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("import_graph", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> dict:
    """The tool's report on this repository, from its own process (parsing every module of the
    repository then leaves nothing behind in the test run)."""
    done = subprocess.run([sys.executable, str(REPO / "tools" / "import_graph.py"), str(REPO), "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def test_planner_module_imports_have_no_cycle(report):
    assert report["cycles"] == [], "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in report["cycles"])
    assert ["planner.search", "planner.pricing"] in report["edges"]  # the graph is the real one


def test_cost_model_imports_no_solver_even_inside_functions(report):
    calls = [(a, b) for a, b in report["deferred_edges"] if a.startswith("planner.cost.")
             and any(b == s or b.startswith(s + ".") for s in SOLVERS)]
    assert calls == []
    # the Pricer sits above both: it is where the cost model and the intra-op ILP meet
    assert {("planner.pricing", "planner.cost.model"), ("planner.pricing", "planner.intra_op.pricing")} <= {
        tuple(e) for e in report["edges"]}


def test_a_cycle_is_found_and_a_package_importing_its_submodules_is_not_one(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("import pkg\nfrom pkg.sub import b\n\ndef f():\n    from pkg import c\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    tool = _tool()
    assert tool.import_cycles(tmp_path, "pkg") == []  # pkg -> pkg.a is a package's own submodule
    (pkg / "sub" / "b.py").write_text("from ..a import f\n")
    assert [sorted(c) for c in tool.import_cycles(tmp_path, "pkg")] == [["pkg.a", "pkg.sub.b"]]
    graph = tool.import_graph(tmp_path, "pkg")
    assert set(graph.successors("pkg.a")) == {"pkg", "pkg.sub.b"}  # not the import inside f
    deferred = tool.import_graph(tmp_path, "pkg", deferred=True)
    assert set(deferred.successors("pkg.a")) == {"pkg", "pkg.sub.b", "pkg.c"}
