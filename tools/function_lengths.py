"""Functions longer than a limit, by ``ast`` (first line of the ``def`` or its decorators to the last line).

    python tools/function_lengths.py                          # the plan path, limit 60
    python tools/function_lengths.py planner/cost --limit 40  # any files or folders

Exit status 1 when some function is over the limit. The plan path is what ``planner.plan()``
runs: the API, the search, the pricing context, the plan builder, the cost model, the stage and
intra-op solvers, the tracer and the schedules (``PLAN_PATH``, whole packages, so a new module is
covered too); ``tests/core/test_function_lengths.py`` holds it to the limit.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAN_PATH = ("planner/api.py", "planner/search.py", "planner/pricing.py", "planner/plan_build.py", "planner/cost",
             "planner/inter_op", "planner/intra_op", "planner/trace", "planner/schedules")
LIMIT = 60


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """``(qualified name, first line, lines)`` of every function and method in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[tuple[str, int, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                first = min([child.lineno] + [d.lineno for d in child.decorator_list])
                out.append((prefix + child.name, first, child.end_lineno - first + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def files(targets: Sequence[str], root: Path = REPO) -> list[Path]:
    out: list[Path] = []
    for target in targets:
        path = root / target
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


def too_long(targets: Sequence[str] = PLAN_PATH, limit: int = LIMIT, root: Path = REPO) -> list[str]:
    """``"path:line name (N lines)"`` for every function over ``limit`` lines in ``targets``."""
    return [f"{path.relative_to(root)}:{line} {name} ({length} lines)"
            for path in files(targets, root) for name, line, length in function_lengths(path) if length > limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/function_lengths.py", description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", default=list(PLAN_PATH), help="files or folders (default: the plan path)")
    parser.add_argument("--limit", type=int, default=LIMIT, help=f"most lines a function may have (default {LIMIT})")
    args = parser.parse_args(argv)
    found = too_long(args.targets, args.limit)
    print("\n".join(found) if found else f"no function over {args.limit} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
