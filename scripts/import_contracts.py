"""import-linter contract types for dvp's layout (registered in pyproject.toml).

Two things the built-in types cannot do here:

* ``worker.py`` is a module at the top level, not a package, and grimp (import-linter's
  graph) scans packages only, so without help its imports would go unchecked. Every
  type below first adds the imports of the session's ``root_modules`` to the graph.
* ``acyclic``: no import cycle anywhere, between modules and between the packages that
  hold them, the top-level ones included. The built-in ``acyclic_siblings`` looks only
  at the children of a named package: not at the top-level packages (they have no
  parent), nor at a package's ``__init__`` and its own modules (``starter.cli``
  importing ``starter.cli.trades`` while that imports ``starter.cli``).
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path
from typing import Any

import grimp
from importlinter import Contract, ContractCheck, output
from importlinter.contracts.forbidden import ForbiddenContract
from importlinter.contracts.layers import LayersContract
from importlinter.contracts.protected import ProtectedContract


def add_root_modules(graph: grimp.ImportGraph, session_options: Mapping[str, Any]) -> None:
    """Add each of ``root_modules`` and its imports to ``graph``, as grimp would for a package's module."""
    roots = [*session_options["root_packages"], *session_options.get("root_modules", [])]
    externals = str(session_options.get("include_external_packages")).lower() == "true"
    for name in session_options.get("root_modules", []):
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or spec.submodule_search_locations is not None:
            raise ValueError(f"root_modules: {name!r} is not a module file on the path")
        # Packages that import the module made it an external, squashed node: make it ours.
        importers = [
            detail
            for importer in graph.find_modules_that_directly_import(name)
            for detail in graph.get_import_details(importer=importer, imported=name)
        ]
        graph.remove_module(name)
        graph.add_module(name)
        for detail in importers:
            graph.add_import(
                importer=detail["importer"],
                imported=name,
                line_number=detail["line_number"],
                line_contents=detail["line_contents"],
            )
        source = Path(spec.origin).read_text()
        lines = source.splitlines()
        for line_number, target in _imports(ast.parse(source)):
            imported = _resolve(graph, target, roots)
            if imported is None and externals:
                imported = target.split(".")[0]
                if imported not in graph.modules:
                    graph.add_module(imported, is_squashed=True)
            if imported is not None and imported != name:
                graph.add_import(
                    importer=name,
                    imported=imported,
                    line_number=line_number,
                    line_contents=lines[line_number - 1].strip(),
                )


def _imports(tree: ast.Module) -> Iterable[tuple[int, str]]:
    # Every import, in functions too, as grimp counts them; each name of a ``from``
    # import may be a module, so it is tried first (see _resolve).
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _resolve(graph: grimp.ImportGraph, target: str, roots: list[str]) -> str | None:
    """The project's module that importing ``target`` imports, or None for another project's."""
    if target.split(".")[0] not in roots:
        return None
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in graph.modules:
            return candidate
    return None


class Layers(LayersContract):
    """The built-in ``layers``, with ``root_modules`` in the graph."""

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        add_root_modules(graph, self.session_options)
        return super().check(graph, verbose)


class Forbidden(ForbiddenContract):
    """The built-in ``forbidden``, with ``root_modules`` in the graph."""

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        add_root_modules(graph, self.session_options)
        return super().check(graph, verbose)


class Protected(ProtectedContract):
    """The built-in ``protected``, with ``root_modules`` in the graph."""

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        add_root_modules(graph, self.session_options)
        return super().check(graph, verbose)


class Acyclic(Contract):
    """No import cycle among the project's modules, nor among the packages at any level."""

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        add_root_modules(graph, self.session_options)
        roots = {*self.session_options["root_packages"], *self.session_options.get("root_modules", [])}
        ours = {m for m in graph.modules if m.split(".")[0] in roots}
        modules: dict[str, set[str]] = {m: set() for m in ours}
        # Within each package (and at the top, ""), its children: an import between two
        # modules in different children is an edge between those children.
        siblings: dict[str, dict[str, set[str]]] = {}
        for importer in ours:
            for imported in graph.find_modules_directly_imported_by(importer) & ours:
                modules[importer].add(imported)
                a, b = importer.split("."), imported.split(".")
                common = 0
                while common < min(len(a), len(b)) and a[common] == b[common]:
                    common += 1
                if common < len(a) and common < len(b):
                    children = siblings.setdefault(".".join(a[:common]), {})
                    children.setdefault(".".join(a[: common + 1]), set()).add(".".join(b[: common + 1]))
        cycles: list[tuple[str | None, list[str]]] = [(None, cycle) for cycle in _cycles(modules)]
        reported = {tuple(cycle) for _, cycle in cycles}
        for package in sorted(siblings):
            # A cycle of single modules in one package was reported as one between modules.
            cycles += [(package, c) for c in _cycles(siblings[package]) if tuple(c) not in reported]
        found = [
            {
                "package": package,
                "cycle": cycle,
                # One import for each step, so the report says where to cut.
                "lines": [_an_import(graph, ours, a, b) for a, b in pairwise(cycle)],
            }
            for package, cycle in cycles
        ]
        return ContractCheck(kept=not found, metadata={"cycles": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for found in check.metadata["cycles"]:
            package = found["package"]
            if package is None:
                where = "between modules"
            else:
                where = f"between the packages in {package}" if package else "between top-level packages"
            output.print_error(f"Import cycle {where}: {' -> '.join(found['cycle'])}")
            for line in found["lines"]:
                output.indent_cursor()
                output.print_error(line, bold=False)
            output.new_line()


def _cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of ``edges``, as a path back to its start."""
    nodes = set(edges).union(*edges.values())
    reach = {node: _reachable(edges, node) for node in nodes}
    cycles: list[list[str]] = []
    seen: set[str] = set()
    for node in sorted(nodes):
        if node in seen or node not in reach[node]:
            continue
        component = {other for other in reach[node] if node in reach[other]}
        seen |= component
        cycles.append(_path_back(edges, node, component))
    return cycles


def _reachable(edges: Mapping[str, set[str]], start: str) -> set[str]:
    found: set[str] = set()
    todo = list(edges.get(start, ()))
    while todo:
        node = todo.pop()
        if node not in found:
            found.add(node)
            todo.extend(edges.get(node, ()))
    return found


def _path_back(edges: Mapping[str, set[str]], start: str, component: set[str]) -> list[str]:
    """A shortest path from ``start`` back to itself, inside ``component``."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for after in sorted(edges.get(node, set()) & component):
                if after == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if after not in previous:
                    previous[after] = node
                    following.append(after)
        frontier = following
    raise AssertionError(f"{start} is not on a cycle")


def _an_import(graph: grimp.ImportGraph, ours: set[str], importer: str, imported: str) -> str:
    """One import by a module in ``importer`` of one in ``imported`` (modules or packages)."""
    for a in sorted(m for m in ours if m == importer or m.startswith(f"{importer}.")):
        for b in sorted(graph.find_modules_directly_imported_by(a) & ours):
            if b == imported or b.startswith(f"{imported}."):
                details = graph.get_import_details(importer=a, imported=b)
                where = f" (l.{details[0]['line_number']})" if details else ""
                return f"{a} -> {b}{where}"
    return f"{importer} -> {imported}"
