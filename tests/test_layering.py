"""The import graph of megacpm: no cycles, and each layer imports only what it may.

Every ``.py`` of megacpm/ (and of kernels/, installed as the package megacpm.kernels) is parsed with
``ast``, without importing anything; every import counts, at module level or inside a function
(a local import is still a dependency; it only runs later). Imports under ``if TYPE_CHECKING:``
never run and are left out. Resolution:

* ``from megacpm.a import b`` is the module megacpm.a.b when that file or package exists, else
  megacpm.a (b is a name defined there); relative imports are resolved against the importer.
* ``import megacpm.a.b`` (or any import of megacpm.a.b) also imports its ancestor packages
  (megacpm.a: Python runs their ``__init__``), except the ancestors of the importing module itself,
  which are already being imported.

The layer rules judge the module named by the import statement (an ancestor package that comes
along with an allowed module is allowed too). Failure messages name importer -> imported and the
line of the import.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"megacpm": ROOT / "megacpm", "megacpm.kernels": ROOT / "kernels"}
EXTENSION_SUFFIXES = (".so", ".pyd")


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _ancestors(module: str) -> List[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def find_modules() -> Dict[str, Tuple[Path, bool]]:
    """{module name: (file, is_package)} of megacpm and megacpm.kernels (compiled extensions too)."""
    modules: Dict[str, Tuple[Path, bool]] = {}
    for package, directory in SOURCES.items():
        for path in sorted(directory.rglob("*")):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            parts = list(path.relative_to(directory).parts)
            if path.suffix == ".py":
                parts[-1] = path.stem
            elif path.suffix in EXTENSION_SUFFIXES:
                parts[-1] = path.name.split(".")[0]  # _C.cpython-311-x86_64-linux-gnu.so -> _C
            else:
                continue
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name in modules and not is_package:
                continue  # a .py and an extension of one name: the .py (is_package wins for dirs)
            modules[name] = (path, is_package)
    return modules


def _is_type_checking_guard(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking_guard(node):
            children = list(node.orelse)  # the guarded body never runs
        stack.extend(children)


class Graph:
    """Edges importer -> imported among megacpm modules, each with where it comes from."""

    def __init__(self) -> None:
        self.modules = find_modules()
        # (importer, imported) -> ["path:line", ...]; imported includes implied ancestor packages
        self.edges: Dict[Tuple[str, str], List[str]] = defaultdict(list)
        # (importer, module named by the import statement) -> ["path:line", ...]
        self.direct: Dict[Tuple[str, str], List[str]] = defaultdict(list)
        for name, (path, is_package) in self.modules.items():
            if path.suffix == ".py":
                self._scan(name, path, is_package)

    def _known(self, module: str) -> Optional[str]:
        """The module itself when it exists, else its longest existing ancestor (None outside megacpm)."""
        if not _in(module, "megacpm"):
            return None
        while module not in self.modules and "." in module:
            module = module.rsplit(".", 1)[0]
        return module if module in self.modules else None

    def _targets(self, importer: str, is_package: bool, node) -> List[str]:
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        if node.level:
            package = importer if is_package else importer.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                package = package.rsplit(".", 1)[0]
            base = f"{package}.{node.module}" if node.module else package
        else:
            base = node.module or ""
        targets = []
        for alias in node.names:
            candidate = f"{base}.{alias.name}"
            targets.append(candidate if alias.name != "*" and candidate in self.modules else base)
        return targets

    def _scan(self, importer: str, path: Path, is_package: bool) -> None:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in _import_nodes(tree):
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for target in self._targets(importer, is_package, node):
                module = self._known(target)
                if module is None or module == importer:
                    continue
                self.direct[(importer, module)].append(where)
                self.edges[(importer, module)].append(where)
                for ancestor in _ancestors(module):
                    if ancestor in self.modules and not _in(importer, ancestor):
                        self.edges[(importer, ancestor)].append(f"{where} (via {module})")

    def successors(self) -> Dict[str, Set[str]]:
        result: Dict[str, Set[str]] = defaultdict(set)
        for importer, imported in self.edges:
            result[importer].add(imported)
        return result


@pytest.fixture(scope="module")
def graph() -> Graph:
    return Graph()


def strongly_connected_components(successors: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's algorithm, iterative (the graph is small, but recursion limits are not our business)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    on_stack: Set[str] = set()
    stack: List[str] = []
    components: List[List[str]] = []
    nodes = sorted(set(successors) | {m for ms in successors.values() for m in ms})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(successors.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(successors.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_in(component: List[str], successors: Dict[str, Set[str]]) -> List[str]:
    """One concrete cycle through the component's first member (breadth-first: a shortest one)."""
    start, members = component[0], set(component)
    parents: Dict[str, Optional[str]] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(successors.get(node, ())):
                if child == start:
                    path = [node]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
                if child in members and child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    return component + component[:1]


def test_no_import_cycles(graph):
    successors = graph.successors()
    cycles = [c for c in strongly_connected_components(successors) if len(c) > 1]
    messages = []
    for component in cycles:
        path = _cycle_in(component, successors)
        steps = [f"{a} -> {b} ({graph.edges[(a, b)][0]})" for a, b in zip(path, path[1:])]
        messages.append(f"import cycle among {', '.join(component)}:\n    " + "\n    ".join(steps))
    assert not cycles, "\n".join(messages)


# (rule, the importers it applies to, whether an imported module is forbidden to them)
RULES = [
    ("the model does not know the parallel engine", "megacpm.model",
     lambda m: _in(m, "megacpm.parallel")),
    ("checkpoints do not know the trainer", "megacpm.checkpoint",
     lambda m: _in(m, "megacpm.train")),
    ("megacpm.io imports nothing of megacpm", "megacpm.io",
     lambda m: not _in(m, "megacpm.io")),
    ("the config imports only the config, megacpm.io and the parallel layout", "megacpm.config",
     lambda m: not any(_in(m, p) for p in ("megacpm.config", "megacpm.io", "megacpm.parallel.layout"))),
    ("the kernels import only the kernels", "megacpm.kernels",
     lambda m: not _in(m, "megacpm.kernels")),
]


@pytest.mark.parametrize("rule, layer, forbidden", RULES, ids=[r[1] for r in RULES])
def test_layer_imports(graph, rule, layer, forbidden):
    violations = sorted(f"{importer} -> {imported} ({', '.join(where)})"
                        for (importer, imported), where in graph.direct.items()
                        if _in(importer, layer) and forbidden(imported))
    assert not violations, f"{rule}; offending imports:\n    " + "\n    ".join(violations)


def test_the_scanner_sees_the_imports_it_must(graph):
    """Guards the test itself: the graph holds imports of every kind it claims to resolve."""
    edges = set(graph.edges)
    assert ("megacpm.config.validate", "megacpm.parallel.layout") in edges  # from a.b import c
    assert ("megacpm.config.validate", "megacpm.parallel") in edges  # the implied ancestor package
    assert ("megacpm.config.validate", "megacpm.config") not in edges  # not the importer's own ancestor
    assert ("megacpm.kernels.rms_norm", "megacpm.kernels.dispatch") in edges  # relative import
    assert ("megacpm.data.blending", "megacpm._C") in edges  # an extension module
    assert ("megacpm.cli", "megacpm.train.trainer") in edges  # an import inside a function
    assert "megacpm.kernels" in graph.modules and "megacpm.io.run_dir" in graph.modules


def test_cycle_detection_reports_a_cycle():
    successors = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    components = [c for c in strongly_connected_components(successors) if len(c) > 1]
    assert components == [["a", "b", "c"]]
    assert _cycle_in(components[0], successors) == ["a", "b", "c", "a"]
