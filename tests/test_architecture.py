"""
Static architecture checks over the ``olladmr`` source, read with ``ast``.

Nothing here imports the package: every module under ``olladmr/`` is parsed
from disk, so the checks hold even while a module cannot be imported.  The
rules:

* the intra-package import graph has no cycle (function-level and
  ``if TYPE_CHECKING:`` imports included);
* only ``olladmr/_twisted_compat.py`` reaches into private Twisted, Klein or
  treq internals, or into private attributes of objects other than
  ``self``/``cls``;
* only ``olladmr/tap.py`` imports the global reactor.

The finders are unit-tested on synthetic sources at the bottom of this file,
so a check cannot pass just because it sees nothing.
"""

from __future__ import annotations

import ast
import functools
from collections import deque
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Mapping

import pytest

#: Repository root; displayed paths are relative to it (``olladmr/service.py``).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The package under test.
PACKAGE = "olladmr"
#: The one module allowed to touch private framework internals.
COMPAT_MODULE = "olladmr/_twisted_compat.py"
#: The only module allowed to import the global reactor (at any level).
REACTOR_MODULES = frozenset({"olladmr/tap.py"})
#: Top-level packages whose underscore names are private internals we must not depend on.
FRAMEWORKS = frozenset({"twisted", "klein", "treq"})
#: Builtins that reach an attribute by a (literal) name.
ATTRIBUTE_BUILTINS = frozenset({"getattr", "hasattr", "setattr", "delattr"})
#: Names that stand for the object whose own private attributes may be used.
OWN_OBJECT_NAMES = frozenset({"self", "cls"})
#: ``(path, expression)`` pairs of olladmr's own private attributes that may be
#: reached from outside their class, e.g. ``("olladmr/workers.py", "self.pool._ended")``.
#: Keep it short, and justify each entry in a comment.
PRIVATE_ALLOWLIST: frozenset[tuple[str, str]] = frozenset()


# -- reading the package


@dataclass(frozen=True)
class Module:
    """One parsed module: dotted name, displayed path, whether it is a package ``__init__``."""

    name: str
    path: str
    is_package: bool
    tree: ast.Module


@dataclass(frozen=True)
class Finding:
    """A rule violation at ``path:line``."""

    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what}"


def parse_module(name: str, source: str, *, is_package: bool = False, path: str | None = None) -> Module:
    """Parse ``source`` as module ``name`` (``path`` defaults to one derived from the name)."""
    if path is None:
        path = name.replace(".", "/") + ("/__init__.py" if is_package else ".py")
    return Module(name=name, path=path, is_package=is_package, tree=ast.parse(source, filename=path))


def load_package(root: Path = REPO_ROOT, package: str = PACKAGE) -> dict[str, Module]:
    """Every ``.py`` file under ``root/package``, parsed, keyed by dotted module name."""
    modules: dict[str, Module] = {}
    for file in sorted((root / package).rglob("*.py")):
        rel = PurePosixPath(file.relative_to(root).as_posix())
        if "__pycache__" in rel.parts:
            continue
        is_package = rel.name == "__init__.py"
        parts = rel.parent.parts if is_package else (*rel.parent.parts, rel.stem)
        name = ".".join(parts)
        modules[name] = parse_module(name, file.read_text(encoding="utf-8"), is_package=is_package, path=str(rel))
    return modules


@functools.cache
def package_modules() -> Mapping[str, Module]:
    """The real ``olladmr`` tree, parsed once per test session."""
    return load_package()


# -- the import graph


@dataclass(frozen=True)
class ImportGraph:
    """Module -> imported module -> line numbers; plus imports that name no module of the tree."""

    edges: Mapping[str, Mapping[str, tuple[int, ...]]]
    unresolved: tuple[Finding, ...]
    paths: Mapping[str, str]


def _namespaces(modules: Iterable[str]) -> set[str]:
    """Every dotted prefix of the given module names (directories, with or without ``__init__``)."""
    prefixes: set[str] = set()
    for name in modules:
        parts = name.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return prefixes


def _from_base(module: Module, node: ast.ImportFrom) -> str | None:
    """The absolute module named by ``from <base> import ...``; None if it climbs above the top."""
    if node.level == 0:
        return node.module or ""
    package = module.name.split(".") if module.is_package else module.name.split(".")[:-1]
    if node.level - 1 >= len(package):
        return None
    anchor = package[: len(package) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def _import_targets(module: Module, known: set[str], namespaces: set[str], package: str) -> Iterator[tuple[str | None, int, str]]:
    """``(target module or None if unresolvable, line, statement)`` for each in-package import in ``module``."""

    def ours(name: str) -> bool:
        return name == package or name.startswith(package + ".")

    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not ours(alias.name):
                    continue
                statement = f"import {alias.name}"
                if alias.name in known:
                    yield alias.name, node.lineno, statement
                elif alias.name not in namespaces:
                    yield None, node.lineno, statement
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(module, node)
            dots = "." * node.level
            names = ", ".join(alias.name for alias in node.names)
            statement = f"from {dots}{node.module or ''} import {names}"
            if base is None:
                yield None, node.lineno, statement
                continue
            if not ours(base):
                continue
            if base in known:
                yield base, node.lineno, statement
            elif base not in namespaces:
                yield None, node.lineno, statement
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in known:
                    yield submodule, node.lineno, statement
                elif base not in known and alias.name != "*" and submodule not in namespaces:
                    yield None, node.lineno, f"{statement} ({submodule} is not a module)"


def build_import_graph(modules: Mapping[str, Module], package: str = PACKAGE) -> ImportGraph:
    """
    The import graph between ``modules``: ``import a.b`` is an edge to ``a.b``;
    ``from p import n`` is an edge to ``p`` and, if ``p.n`` is a module, to ``p.n``.
    Imports at every level count (module, function, ``if TYPE_CHECKING:``).
    """
    known = set(modules)
    namespaces = _namespaces(known)
    edges: dict[str, dict[str, list[int]]] = {name: {} for name in modules}
    unresolved: list[Finding] = []
    for name, module in modules.items():
        for target, line, statement in _import_targets(module, known, namespaces, package):
            if target is None:
                unresolved.append(Finding(module.path, line, statement))
            elif target != name:
                edges[name].setdefault(target, []).append(line)
    return ImportGraph(
        edges={src: {dst: tuple(sorted(set(lines))) for dst, lines in out.items()} for src, out in edges.items()},
        unresolved=tuple(unresolved),
        paths={name: module.path for name, module in modules.items()},
    )


def strongly_connected_components(edges: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative), each component sorted; components listed in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in edges:
                    continue
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return sorted(components)


def _shortest_cycle_through(start: str, edges: Mapping[str, Mapping[str, object]], within: set[str]) -> list[str] | None:
    """The shortest path ``start -> ... -> start`` inside ``within``, by breadth-first search."""
    previous: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for child in sorted(edges.get(node, {})):
            if child not in within:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if child not in seen:
                seen.add(child)
                previous[child] = node
                queue.append(child)
    return None


def find_cycles(edges: Mapping[str, Mapping[str, object]]) -> list[list[str]]:
    """
    For every import cycle component, the shortest cycle through each of its
    modules (deduplicated, rotated to start at its smallest module), e.g.
    ``["a", "b", "a"]``.
    """
    cycles: set[tuple[str, ...]] = set()
    for component in strongly_connected_components(edges):
        members = set(component)
        if len(component) == 1 and component[0] not in edges.get(component[0], {}):
            continue
        for start in component:
            cycle = _shortest_cycle_through(start, edges, members)
            if cycle is None:
                continue
            ring = cycle[:-1]
            pivot = ring.index(min(ring))
            ring = ring[pivot:] + ring[:pivot]
            cycles.add((*ring, ring[0]))
    return [list(cycle) for cycle in sorted(cycles, key=lambda c: (len(c), c))]


def describe_cycle(cycle: list[str], graph: ImportGraph) -> str:
    """``a -> b -> a`` followed by where each of those imports is written."""
    lines = [" -> ".join(cycle)]
    for src, dst in zip(cycle, cycle[1:]):
        where = ", ".join(str(line) for line in graph.edges[src][dst])
        lines.append(f"    {src} -> {dst}  ({graph.paths.get(src, src)}:{where})")
    return "\n".join(lines)


# -- private framework internals


def _is_private(name: str) -> bool:
    """An underscore name that is not a dunder (``_x`` and ``__x``, but not ``__x__``)."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_framework(module: str) -> bool:
    return module.split(".")[0] in FRAMEWORKS


def find_private_imports(module: Module) -> list[Finding]:
    """Imports of private names or private modules from Twisted, Klein or treq."""
    findings: list[Finding] = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _is_framework(alias.name) and any(_is_private(part) for part in alias.name.split(".")):
                    findings.append(Finding(module.path, node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_framework(node.module):
            private_module = any(_is_private(part) for part in node.module.split("."))
            for alias in node.names:
                if private_module or _is_private(alias.name):
                    findings.append(Finding(module.path, node.lineno, f"from {node.module} import {alias.name}"))
    return findings


def find_private_attributes(module: Module, allowlist: frozenset[tuple[str, str]] = PRIVATE_ALLOWLIST) -> list[Finding]:
    """
    ``x._name`` where ``x`` is not ``self``/``cls``, and ``getattr``-style
    calls on such an ``x`` with a literal private name, minus ``allowlist``.
    """
    findings: list[Finding] = []
    for node in ast.walk(module.tree):
        expression: str | None = None
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in OWN_OBJECT_NAMES):
                expression, line = ast.unparse(node), node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ATTRIBUTE_BUILTINS
            and len(node.args) >= 2
            and not (isinstance(node.args[0], ast.Name) and node.args[0].id in OWN_OBJECT_NAMES)
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
        ):
            expression, line = ast.unparse(node), node.lineno
        if expression is not None and (module.path, expression) not in allowlist:
            findings.append(Finding(module.path, line, expression))
    return sorted(findings, key=lambda f: (f.path, f.line, f.what))


# -- the global reactor


class _ReactorImportFinder(ast.NodeVisitor):
    """Collects imports of ``twisted.internet.reactor``, noting the enclosing function."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.findings: list[Finding] = []

    def _where(self) -> str:
        return f"in {'.'.join(self.scope)}" if self.scope else "at module level"

    def _scoped(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == "twisted.internet.reactor" or alias.name.startswith("twisted.internet.reactor."):
                self.findings.append(Finding(self.path, node.lineno, f"import {alias.name} ({self._where()})"))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            return
        for alias in node.names:
            if (node.module == "twisted.internet" and alias.name == "reactor") or node.module == "twisted.internet.reactor":
                self.findings.append(Finding(self.path, node.lineno, f"from {node.module} import {alias.name} ({self._where()})"))


def find_reactor_imports(module: Module) -> list[Finding]:
    """Every import of the global reactor in ``module``, at any level."""
    finder = _ReactorImportFinder(module.path)
    finder.visit(module.tree)
    return finder.findings


def _report(title: str, findings: Iterable[object]) -> str:
    return "\n".join([title, *(f"  {finding}" for finding in findings)])


# -- the rules, applied to the real tree


def test_package_scan_sees_the_package() -> None:
    """The scan finds olladmr's modules and imports between them, so the rules below are not vacuous."""
    modules = package_modules()
    assert PACKAGE in modules and "olladmr._twisted_compat" in modules and "olladmr.tap" in modules, sorted(modules)
    assert len(modules) >= 10, sorted(modules)
    graph = build_import_graph(modules)
    assert sum(len(out) for out in graph.edges.values()) >= 10, graph.edges


def test_package_imports_resolve() -> None:
    """Every import of an olladmr module names a module that exists, so the import graph is complete."""
    graph = build_import_graph(package_modules())
    if graph.unresolved:
        pytest.fail(_report("imports naming no module in olladmr/:", graph.unresolved), pytrace=False)


def test_no_import_cycles() -> None:
    """The olladmr import graph, counting function-level and TYPE_CHECKING imports, has no cycle."""
    graph = build_import_graph(package_modules())
    cycles = find_cycles(graph.edges)
    if cycles:
        pytest.fail(_report(f"{len(cycles)} import cycle(s):", (describe_cycle(c, graph) for c in cycles)), pytrace=False)


def test_no_private_framework_imports_outside_compat() -> None:
    """Only the compatibility module imports private names or modules from Twisted, Klein or treq."""
    findings = [f for m in package_modules().values() if m.path != COMPAT_MODULE for f in find_private_imports(m)]
    if findings:
        pytest.fail(_report(f"private framework imports outside {COMPAT_MODULE}:", findings), pytrace=False)


def test_no_private_attribute_access_outside_compat() -> None:
    """Only the compatibility module reaches private attributes of objects other than self/cls."""
    findings = [f for m in package_modules().values() if m.path != COMPAT_MODULE for f in find_private_attributes(m)]
    if findings:
        pytest.fail(_report(f"private attribute access outside {COMPAT_MODULE}:", findings), pytrace=False)


def test_global_reactor_imported_only_by_tap() -> None:
    """Only olladmr/tap.py imports the global reactor, at module or function level."""
    findings = [f for m in package_modules().values() if m.path not in REACTOR_MODULES for f in find_reactor_imports(m)]
    if findings:
        pytest.fail(_report("global reactor imported outside olladmr/tap.py:", findings), pytrace=False)


def private_channel_overrides(classes: Iterable[type]) -> list[str]:
    """``Class.name`` for every underscored name of Twisted's ``HTTPChannel`` that one of ``classes`` defines."""
    from twisted.web.http import HTTPChannel

    theirs = {name for base in HTTPChannel.__mro__ for name in vars(base)
              if name.startswith("_") and not (name.startswith("__") and name.endswith("__"))}
    return [f"{cls.__module__}.{cls.__qualname__}.{name}" for cls in classes if issubclass(cls, HTTPChannel)
            for name in vars(cls) if name in theirs]


def _olladmr_classes() -> list[type]:
    import importlib
    import inspect

    found = []
    for name, module in package_modules().items():
        if module.path == COMPAT_MODULE or name == "olladmr.tap":
            continue
        loaded = importlib.import_module(name)
        found += [value for _, value in inspect.getmembers(loaded, inspect.isclass) if value.__module__ == name]
    return found


def test_no_override_of_private_http_channel_methods_outside_compat() -> None:
    """No HTTPChannel subclass outside the compatibility module overrides one of Twisted's underscored names."""
    classes = _olladmr_classes()
    from twisted.web.http import HTTPChannel

    assert any(issubclass(c, HTTPChannel) for c in classes)  # (the server's channel is among them: not vacuous)
    findings = private_channel_overrides(classes)
    if findings:
        pytest.fail(_report(f"overrides of private HTTPChannel names outside {COMPAT_MODULE}:", findings),
                    pytrace=False)


def test_private_channel_override_finder_finds_one() -> None:
    from twisted.web.http import HTTPChannel

    class Sneaky(HTTPChannel):
        def _finishRequestBody(self, data: bytes) -> None:  # one of Twisted's own private methods
            pass

        def _mine(self) -> None:  # a private name of our own: fine
            pass

    assert private_channel_overrides([Sneaky]) == [f"{Sneaky.__module__}.{Sneaky.__qualname__}._finishRequestBody"]


def test_allowlist_entries_are_still_used() -> None:
    """Every PRIVATE_ALLOWLIST entry still matches a use in the tree, so the allowlist cannot go stale."""
    used = {(f.path, f.what) for m in package_modules().values() for f in find_private_attributes(m, frozenset())}
    assert not PRIVATE_ALLOWLIST - used, sorted(PRIVATE_ALLOWLIST - used)


# -- the finders, on synthetic sources


def _graph(sources: Mapping[str, str], packages: Iterable[str] = ()) -> ImportGraph:
    package_names = set(packages)
    modules = {name: parse_module(name, source, is_package=name in package_names) for name, source in sources.items()}
    return build_import_graph(modules, package="pkg")


def test_cycle_finder_finds_a_two_module_cycle() -> None:
    """Two modules importing each other form the cycle a -> b -> a."""
    graph = _graph({"pkg": "", "pkg.a": "from pkg import b\n", "pkg.b": "import pkg.a\n"}, packages=["pkg"])
    assert find_cycles(graph.edges) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert "pkg.a -> pkg.b -> pkg.a" in describe_cycle(["pkg.a", "pkg.b", "pkg.a"], graph)


def test_cycle_finder_finds_a_longer_cycle_and_ignores_acyclic_graphs() -> None:
    """A three-module ring is one cycle; a diamond of imports is none."""
    ring = _graph({"pkg.a": "import pkg.b\n", "pkg.b": "import pkg.c\n", "pkg.c": "import pkg.a\n"})
    assert find_cycles(ring.edges) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]
    diamond = _graph({"pkg.a": "import pkg.b, pkg.c\n", "pkg.b": "import pkg.d\n", "pkg.c": "import pkg.d\n", "pkg.d": "import os\n"})
    assert find_cycles(diamond.edges) == []


def test_cycle_finder_resolves_relative_imports() -> None:
    """Relative imports resolve against the importing module's package, in modules and in __init__ files."""
    graph = _graph(
        {
            "pkg": "",
            "pkg.fleet": "from . import state\n",
            "pkg.fleet.state": "from ..config.schema import Config\nfrom .models import Model\n",
            "pkg.fleet.models": "",
            "pkg.config": "",
            "pkg.config.schema": "from ..fleet import models\n",
        },
        packages=["pkg", "pkg.fleet", "pkg.config"],
    )
    assert graph.edges["pkg.fleet"] == {"pkg.fleet.state": (1,)}
    assert graph.edges["pkg.fleet.state"] == {"pkg.config.schema": (1,), "pkg.fleet.models": (2,)}
    assert graph.edges["pkg.config.schema"] == {"pkg.fleet": (1,), "pkg.fleet.models": (1,)}
    assert graph.unresolved == ()
    assert find_cycles(graph.edges) == [["pkg.config.schema", "pkg.fleet", "pkg.fleet.state", "pkg.config.schema"]]


def test_cycle_finder_counts_type_checking_and_function_level_imports() -> None:
    """Imports under ``if TYPE_CHECKING:`` and inside functions are edges, so they can close a cycle."""
    graph = _graph(
        {
            "pkg.service": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.routes import Routes\n",
            "pkg.routes": "def make():\n    from pkg.service import Service\n    return Service\n",
        }
    )
    assert find_cycles(graph.edges) == [["pkg.routes", "pkg.service", "pkg.routes"]]


def test_cycle_finder_treats_from_package_import_as_edges_to_package_and_submodule() -> None:
    """``from p import n`` reaches p's __init__ and, when n is a module, p.n; other names reach only p."""
    graph = _graph(
        {"pkg": "", "pkg.fleet": "from .state import Fleet\n", "pkg.fleet.state": "", "pkg.user": "from pkg.fleet import state, Fleet\n"},
        packages=["pkg", "pkg.fleet"],
    )
    assert graph.edges["pkg.user"] == {"pkg.fleet": (1,), "pkg.fleet.state": (1,)}
    assert find_cycles(graph.edges) == []


def test_cycle_finder_reports_a_submodule_importing_its_reexporting_package() -> None:
    """A submodule importing its own package's __init__, which re-exports that submodule, is a cycle."""
    graph = _graph(
        {"pkg": "", "pkg.fleet": "from .state import Fleet\n", "pkg.fleet.state": "from pkg.fleet import Model\n"},
        packages=["pkg", "pkg.fleet"],
    )
    assert find_cycles(graph.edges) == [["pkg.fleet", "pkg.fleet.state", "pkg.fleet"]]


def test_cycle_finder_ignores_outside_imports_and_flags_unresolved_ones() -> None:
    """Imports of other packages are not edges; in-package imports of missing modules are reported."""
    graph = _graph(
        {"pkg": "", "pkg.a": "import os\nfrom twisted.web import client\nfrom .gone import x\nimport pkg.missing\nfrom ... import y\n"},
        packages=["pkg"],
    )
    assert graph.edges["pkg.a"] == {}
    assert [(f.line, f.what) for f in graph.unresolved] == [
        (3, "from .gone import x"),
        (4, "import pkg.missing"),
        (5, "from ... import y"),
    ]


def test_private_import_finder() -> None:
    """Private names and private modules of Twisted, Klein and treq are flagged; our own and public ones are not."""
    module = parse_module(
        "pkg.a",
        "from twisted.web.client import Agent, _HTTP11ClientFactory\n"
        "from twisted.web._newclient import Request\n"
        "import twisted.internet._sslverify\n"
        "from klein import _app\n"
        "from twisted import __version__\n"
        "from pkg.config import _Section\n"
        "from ._private import thing\n",
    )
    assert [str(f) for f in find_private_imports(module)] == [
        "pkg/a.py:1: from twisted.web.client import _HTTP11ClientFactory",
        "pkg/a.py:2: from twisted.web._newclient import Request",
        "pkg/a.py:3: import twisted.internet._sslverify",
        "pkg/a.py:4: from klein import _app",
    ]


def test_private_attribute_finder() -> None:
    """``self._x``, ``cls._x`` and dunders pass; ``request._disconnected`` and literal getattr names are flagged."""
    module = parse_module(
        "pkg.a",
        "class A:\n"
        "    def f(self, request):\n"
        "        self._x = 1\n"
        "        cls = type(self); cls._y\n"
        "        request.__class__.__name__\n"
        "        request._disconnected\n"
        "        self.reactor._exitSignal = None\n"
        "        getattr(request, '_disconnected', False)\n"
        "        getattr(request, 'finished')\n"
        "        hasattr(self, '_z')\n"
        "        setattr(request, '_y', 1)\n",
    )
    assert [(f.line, f.what) for f in find_private_attributes(module)] == [
        (6, "request._disconnected"),
        (7, "self.reactor._exitSignal"),
        (8, "getattr(request, '_disconnected', False)"),
        (11, "setattr(request, '_y', 1)"),
    ]
    allow = frozenset({("pkg/a.py", "request._disconnected")})
    assert (6, "request._disconnected") not in [(f.line, f.what) for f in find_private_attributes(module, allow)]


def test_reactor_import_finder() -> None:
    """Global-reactor imports are found at module and function level, under any alias; other imports are not."""
    module = parse_module(
        "pkg.a",
        "from twisted.internet import reactor\n"
        "from twisted.internet import task, defer\n"
        "import twisted.internet.reactor\n"
        "class S:\n"
        "    def start(self):\n"
        "        from twisted.internet import reactor as global_reactor\n",
    )
    assert [str(f) for f in find_reactor_imports(module)] == [
        "pkg/a.py:1: from twisted.internet import reactor (at module level)",
        "pkg/a.py:3: import twisted.internet.reactor (at module level)",
        "pkg/a.py:6: from twisted.internet import reactor (in S.start)",
    ]


@pytest.mark.parametrize(
    ("name", "is_package", "level", "target", "expected"),
    [
        ("pkg.fleet.state", False, 1, None, "pkg.fleet"),
        ("pkg.fleet.state", False, 2, "config", "pkg.config"),
        ("pkg.fleet", True, 1, "state", "pkg.fleet.state"),
        ("pkg.fleet", True, 2, None, "pkg"),
        ("pkg", True, 2, None, None),
    ],
)
def test_relative_import_base(name: str, is_package: bool, level: int, target: str | None, expected: str | None) -> None:
    """``from <dots><module> import`` resolves like the import system does, relative to the importer's package."""
    module = parse_module(name, "", is_package=is_package)
    node = ast.ImportFrom(module=target, names=[ast.alias(name="x")], level=level)
    assert _from_base(module, node) == expected
