"""No function over 60 lines on the plan path (``tools/function_lengths.py``; issue 20)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("function_lengths", REPO / "tools" / "function_lengths.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("function_lengths", module)
    spec.loader.exec_module(module)
    return module


def test_plan_path_has_no_function_over_the_limit():
    tool = _tool()
    assert tool.too_long() == []


def test_the_tool_finds_a_long_function(tmp_path: Path):
    tool = _tool()
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "m.py").write_text(f"class A:\n    @staticmethod\n    def long():\n{body.replace('    ', '        ')}\n"
                                   "def short():\n    return 1\n")
    assert tool.too_long(["m.py"], 60, root=tmp_path) == ["m.py:2 A.long (63 lines)"]
    assert tool.function_lengths(tmp_path / "m.py")[1] == ("short", 65, 2)


def test_default_targets_cover_the_plan_path_packages():
    tool = _tool()
    covered = {path.relative_to(REPO).as_posix() for path in tool.files(tool.PLAN_PATH)}
    for package in ("cost", "inter_op", "intra_op", "trace", "schedules"):
        modules = {p.relative_to(REPO).as_posix() for p in (REPO / "planner" / package).rglob("*.py")}
        assert modules and modules <= covered, package
    for module in ("api.py", "search.py", "pricing.py", "plan_build.py"):
        assert f"planner/{module}" in covered
