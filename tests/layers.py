"""The project's import graph, read from the source with ``ast``; tests/test_layers.py checks it.

What counts as an edge: every ``import`` and ``from ... import`` statement anywhere in a file (module
level, inside functions and methods, try/except, ``if TYPE_CHECKING:``), and
``importlib.import_module("literal")``. Relative imports are resolved to absolute names.
``from pkg import name`` is an edge to ``pkg.name`` when that is a module of the project, else to
``pkg`` (its ``__init__``); ``import a.b.c`` is an edge to ``a.b.c`` only. The implicit edge from a
module to the packages above it (Python runs their ``__init__`` first) is left out on purpose: every
package whose ``__init__`` re-exports its modules would be a circle; ``from . import x`` written out
is counted.

``if TYPE_CHECKING:`` imports are marked ``typing_only``: they never run, so they cannot close a
circle (``circles`` skips them), but they still say which layer a module depends on (``violations``
counts them).

The project's modules: ``moe_cluster/`` (packages and modules), ``kernels/`` (installed as
``moe_kernels``), and the scripts ``jobs/*.py`` (``jobs.<name>``; a script's ``import bench`` is the
script beside it, as Python puts the script's folder on ``sys.path``).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

# Where each top-level name lives in the source tree (pyproject's package-dir: kernels/ is moe_kernels).
SOURCES = {"moe_cluster": "moe_cluster", "moe_kernels": "kernels"}
SCRIPTS = "jobs"  # plain scripts, not a package: the top of the project


@dataclasses.dataclass(frozen=True)
class Edge:
    src: str  # importing module, e.g. moe_cluster.model.config
    dst: str  # imported project module
    where: str  # file:line of the import statement, relative to the root
    typing_only: bool = False  # inside `if TYPE_CHECKING:`: never run

    def __str__(self):
        return f"{self.where}: {self.src} imports {self.dst}" + (" (TYPE_CHECKING)" if self.typing_only else "")


@dataclasses.dataclass
class Graph:
    modules: dict[str, Path]  # module name -> file
    edges: list[Edge]
    unknown: list[str]  # "file:line: name" for imports of a project name that is no module of the tree (no edge)


def find_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for top, folder in SOURCES.items():
        for path in sorted((root / folder).rglob("*.py")) if (root / folder).is_dir() else []:
            parts = path.relative_to(root / folder).with_suffix("").parts
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join((top, *parts))
            if name not in modules or modules[name].name != "__init__.py":  # x/__init__.py beside x.py wins
                modules[name] = path
    for path in sorted((root / SCRIPTS).glob("*.py")) if (root / SCRIPTS).is_dir() else []:
        modules[f"{SCRIPTS}.{path.stem}"] = path
    return modules


def _typing_only_nodes(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside the body of an ``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else None
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    found.update(id(n) for n in ast.walk(stmt))
    return found


def _import_module_literal(node: ast.Call) -> str | None:
    """The literal name in ``importlib.import_module("x")`` / ``import_module("x")``, else None."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name != "import_module" or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def build(root: Path) -> Graph:
    root = Path(root)
    modules = find_modules(root)
    edges, unknown = [], []
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = _typing_only_nodes(tree)
        where = lambda node: f"{path.relative_to(root)}:{node.lineno}"  # noqa: E731

        def resolve(module: str | None, level: int, node) -> str | None:
            if not level:
                if name.startswith(SCRIPTS + ".") and f"{SCRIPTS}.{module}" in modules:
                    return f"{SCRIPTS}.{module}"  # a script importing the one beside it
                return module
            parts = package.split(".")
            if level - 1 >= len(parts) or not package:
                raise ValueError(f"{where(node)}: relative import beyond the top of {name}")
            base = ".".join(parts[: len(parts) - (level - 1)])
            return f"{base}.{module}" if module else base

        def add(target: str, node):
            if target.split(".")[0] not in (*SOURCES, SCRIPTS):
                return  # stdlib or a third-party package
            if target not in modules:  # a module that moved away, or `import pkg.obj`: an ImportError when run
                unknown.append(f"{where(node)}: {target}")
            elif target != name:  # a package's `from . import obj`: its own __init__, no circle
                edges.append(Edge(name, target, where(node), id(node) in typing_only))

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(resolve(alias.name, 0, node), node)
            elif isinstance(node, ast.ImportFrom):
                base = resolve(node.module, node.level, node)
                for alias in node.names:
                    # `from pkg import mod` imports pkg.mod; `from pkg import obj` imports pkg.
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else base, node)
            elif isinstance(node, ast.Call) and (literal := _import_module_literal(node)):
                level = len(literal) - len(literal.lstrip("."))
                add(resolve(literal[level:] or None, level, node), node)
    return Graph(modules, sorted(set(edges), key=lambda e: (e.src, e.dst, e.where)), sorted(set(unknown)))


def circles(graph: Graph) -> list[str]:
    """Each strongly connected component of the run-time graph, as one shortest circle with its edges."""
    succ: dict[str, dict[str, Edge]] = {m: {} for m in graph.modules}
    for edge in graph.edges:
        if not edge.typing_only:
            succ[edge.src].setdefault(edge.dst, edge)
    found = []
    for component in _strongly_connected(succ):
        if len(component) < 2:
            continue
        start = min(component)
        path = _shortest_circle(start, succ, component)
        steps = [succ[a][b] for a, b in zip(path, path[1:])]
        found.append(" -> ".join(path) + "".join(f"\n    {e}" for e in steps) +
                     (f"\n    (component: {', '.join(sorted(component))})" if len(component) > len(path) - 1 else ""))
    return found


def _strongly_connected(succ: dict[str, dict]) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on a deep import chain)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in sorted(succ):
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
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
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                out.append(component)
    return out


def _shortest_circle(start: str, succ: dict[str, dict], within: set[str]) -> list[str]:
    """Breadth-first from start back to start, staying inside its component: [start, ..., start]."""
    parent, frontier = {}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(succ[node]):
                if child not in within:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in no circle")


def component(module: str) -> str:
    """The part of the project a module belongs to: moe_cluster.<X>, the root moe_cluster, moe_kernels or jobs."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "moe_cluster" else parts[0]


def violations(graph: Graph, layers: dict[str, int], forbidden: dict[str, set[str]] | None = None) -> list[str]:
    """Edges that do not point strictly down the table (same layer, different parts: also refused), and
    edges down to a part that ``forbidden[part]`` names."""
    forbidden = forbidden or {}
    found = []
    for part in sorted({component(m) for m in graph.modules} - set(layers)):
        found.append(f"place {part} in LAYERS: a part of the tree with no layer")
    for part in sorted(set(layers) - {component(m) for m in graph.modules}):
        found.append(f"LAYERS names {part}, which is not in the tree: remove it")
    for edge in graph.edges:
        src, dst = component(edge.src), component(edge.dst)
        if src == dst or src not in layers or dst not in layers:
            continue
        if layers[src] <= layers[dst]:
            how = "the same layer" if layers[src] == layers[dst] else "a higher layer"
            found.append(f"{edge}: {src} (layer {layers[src]}) imports {dst} (layer {layers[dst]}), {how}")
        elif dst in forbidden.get(src, ()):
            found.append(f"{edge}: {src} must not import {dst}, though it is lower (FORBIDDEN)")
    return found
