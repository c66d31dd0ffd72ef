"""The import graph of the project's own modules, read from the source (every ``import``, also those inside
functions; ``if TYPE_CHECKING:`` blocks excluded), and its cycles.

    python tools/import_graph.py [--package sweeps]   # prints the edges' count and every cycle; exit 1 on a cycle

Top-level folders are sub-packages of ``brats_ugrip`` when installed, so ``sweeps.x`` and ``brats_ugrip.sweeps.x``
name one module here.
"""
from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("brats_ugrip", "sweeps", "slurm", "souping", "ensembling", "synthetic", "mlcube", "tools", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] != "brats_ugrip":
        parts.insert(0, "brats_ugrip")
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(tree: ast.AST, known: set[str]) -> set[str]:
    """The project modules a module's code imports (``from a import b`` counts ``a.b`` when that is a module)."""
    found: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            names = []
        for name in names:
            name = name if name.startswith("brats_ugrip") else f"brats_ugrip.{name}"
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != "brats_ugrip":
                found.add(name)
        stack.extend(ast.iter_child_nodes(node))
    return found


def graph() -> dict[str, set[str]]:
    files = [p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py") if "dev-cluster" not in p.parts]
    known = {module_name(p) for p in files}
    edges = {}
    for path in files:
        name = module_name(path)
        packages = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
        edges[name] = imported(ast.parse(path.read_text()), known) - {name} - packages
    return edges


def cycles(edges: dict[str, set[str]], prefix: str) -> list[list[str]]:
    """Strongly connected components with more than one module, among modules under ``prefix`` (Tarjan)."""
    nodes = sorted(n for n in edges if n.startswith(prefix))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(edges[node]):
            if not other.startswith(prefix):
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", default="sweeps", help="folder whose modules are checked (default: sweeps)")
    args = parser.parse_args(argv)
    edges = graph()
    prefix = f"brats_ugrip.{args.package}" if args.package != "brats_ugrip" else "brats_ugrip"
    inside = {n: {o for o in e if o.startswith(prefix)} for n, e in edges.items() if n.startswith(prefix)}
    found = cycles(edges, prefix)
    print(f"{prefix}: {len(inside)} modules, {sum(map(len, inside.values()))} imports among them, "
          f"{len(found)} cycles")
    for component in found:
        print("cycle: " + " ↔ ".join(component))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
