"""The import graph of both packages: ``python -m tests.graph`` (``make graph``).

Prints, for each module, the modules of the two packages it imports (type-
checking imports left out, as the import-linter contracts of ``make lint`` do),
then every import circle: groups of modules that import each other, directly
or not. Built with grimp, the library import-linter reads the code with.
"""

from __future__ import annotations

import sys

import grimp

PACKAGES = ("flask_pymacaron_async", "pymacaron_async")


def circles(graph: grimp.ImportGraph, modules: list[str]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in modules:
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    sys.setrecursionlimit(10_000)
    for module in modules:
        if module not in index:
            visit(module)
    return found


def main() -> None:
    graph = grimp.build_graph(*PACKAGES, exclude_type_checking_imports=True)
    # The packages' own __init__ modules re-export names: leave them out of the rooms.
    modules = sorted(m for m in graph.modules if m.startswith(PACKAGES) and m not in PACKAGES)
    for module in modules:
        imported = sorted(i for i in graph.find_modules_directly_imported_by(module) if i in modules)
        short = [i.rsplit(".", 1)[-1] if i.split(".")[0] == module.split(".")[0] else i for i in imported]
        print(f"{module} -> {', '.join(short) or '(nothing of ours)'}")
    found = circles(graph, modules)
    print()
    if not found:
        print("No import circle.")
    for group in found:
        print(f"Import circle of {len(group)} modules: {' <-> '.join(group)}")


if __name__ == "__main__":
    main()
