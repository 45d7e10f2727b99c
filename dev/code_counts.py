"""The size counts of the newcomer-code issue: functions over 60 lines, files over 500 lines and
elementary import cycles among edje's modules (function-local imports included; a package's
`__init__` counts as the module `edje.x`).

    python dev/code_counts.py src/edje [--no-init-edges]

`--no-init-edges` leaves out edges into a package `__init__` (the re-exports every package has).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # a submodule by name, else a name the module defines
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Elementary cycles, each once (rotated to start at its smallest module)."""
    found = set()

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in graph[node]:
            if nxt == start:
                found.add(tuple(path))
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return [list(c) for c in sorted(found)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the package folder, e.g. src/edje")
    parser.add_argument("--no-init-edges", action="store_true")
    args = parser.parse_args()
    files = sorted(args.root.rglob("*.py"))
    trees = {path: ast.parse(path.read_text(), str(path)) for path in files}
    long = [
        (f"{path}:{node.lineno}", node.name, node.end_lineno - node.lineno + 1)
        for path, tree in trees.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > 60
    ]
    big = [(str(p), n) for p in files if (n := len(p.read_text().splitlines())) > 500]
    names = {path: module_name(path, args.root) for path in files}
    inits = {names[p] for p in files if p.name == "__init__.py"}
    known = inits | set(names.values())

    def edges(path: Path, tree: ast.AST) -> set[str]:
        found = imported(tree, names[path], path.name == "__init__.py", known) & known
        found.discard(names[path])
        return found - inits if args.no_init_edges else found

    graph = {names[p]: edges(p, tree) for p, tree in trees.items()}
    found = cycles(graph)
    print(f"functions over 60 lines: {len(long)}")
    for where, name, n in long:
        print(f"  {where} {name} ({n})")
    print(f"files over 500 lines: {len(big)}")
    for where, n in big:
        print(f"  {where} ({n})")
    print(f"elementary import cycles: {len(found)}")
    for cycle in found:
        print("  " + " -> ".join([*cycle, cycle[0]]))


if __name__ == "__main__":
    main()
