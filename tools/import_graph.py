"""The import graph of a package's modules (module-level imports only), and its cycles.

``python tools/import_graph.py`` prints the cycles of ``planner/`` (none expected) or "no cycle".
A package importing its own submodules (``planner/__init__.py`` re-exporting ``planner.api``) is
how packages are built, not a dependency, so those edges are left out; everything else counts,
including a submodule importing its parent package. Imports inside functions and under
``if TYPE_CHECKING:`` do not run at import time and are not edges (``--deferred`` counts them too).
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of ``package`` (a folder under ``root``): dotted name -> file."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _top_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" in ast.unparse(node.test):
                found.extend(_top_level_imports(node.orelse))
            else:
                found.extend(_top_level_imports(node.body) + _top_level_imports(node.orelse))
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *[h.body for h in node.handlers]):
                found.extend(_top_level_imports(block))
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` that one import statement of ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's package, up level - 1 more
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[:len(anchor) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
    out = set()
    for name in names:
        while name and name not in known:  # "planner.cost.model.evaluate" -> the module that holds it
            name = name.rpartition(".")[0]
        if name:
            out.add(name)
    return out


def _all_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def import_graph(root: Path = REPO, package: str = "planner", *, deferred: bool = False) -> nx.DiGraph:
    """Module -> module it imports at module level, without a package's edges to its own submodules
    (``deferred``: imports inside functions and under ``TYPE_CHECKING`` too)."""
    known = module_names(root, package)
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for module, path in known.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in (_all_imports(tree) if deferred else _top_level_imports(tree.body)):
            for target in _targets(node, module, is_package, known):
                if target == module or (is_package and target.startswith(module + ".")):
                    continue
                graph.add_edge(module, target)
    return graph


def import_cycles(root: Path = REPO, package: str = "planner", *, deferred: bool = False) -> list[list[str]]:
    """A cycle through each strongly connected set of :func:`import_graph` (empty: none), shortest first."""
    graph = import_graph(root, package, deferred=deferred)
    cycles = []
    for component in nx.strongly_connected_components(graph):
        if len(component) > 1:
            cycles.append(nx.find_cycle(graph.subgraph(component)))
    return sorted(([a for a, _ in cycle] for cycle in cycles), key=len)


def main(argv: list[str] | None = None) -> int:
    """``python tools/import_graph.py [ROOT] [--deferred] [--json]``: print the cycles (exit 1 if any);
    with ``--json``, the module-level cycles and the edges of both graphs as one JSON object."""
    args = sys.argv[1:] if argv is None else argv
    roots = [a for a in args if not a.startswith("--")]
    root = Path(roots[0]) if roots else REPO
    if "--json" in args:
        print(json.dumps({"cycles": import_cycles(root),
                          "edges": sorted(import_graph(root).edges),
                          "deferred_edges": sorted(import_graph(root, deferred=True).edges)}))
        return 0
    cycles = import_cycles(root, deferred="--deferred" in args)
    for cycle in cycles:
        print(" -> ".join(cycle + cycle[:1]))
    if not cycles:
        print("no cycle")
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
