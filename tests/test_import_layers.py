"""docs/design.md's layer rule, read from the source: each layer imports only the layers below
it, and no module of the package imports itself back through others (an import circle).

Static: every `import` / `from ... import` of ptuning_fast/ and kernels/ (installed as
ptuning_fast.kernels), function-level ones included, parsed with `ast`; nothing is imported.
An edge to a package's `__init__` counts only where a name defined there is imported (Python
runs a parent package's `__init__` before any submodule: that is not an import of it).
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ((ROOT / "ptuning_fast", "ptuning_fast"), (ROOT / "kernels", "ptuning_fast.kernels"))

# design.md's layers, lowest first, as module-name prefixes. Modules outside them (config,
# validation, packing, ...) are helpers: only the circle check applies to them.
LAYERS = (
    ("ptuning_fast.kernels",),
    ("ptuning_fast.reference",),
    ("ptuning_fast.torch_path",),
    ("ptuning_fast.ops", "ptuning_fast.fused"),
    ("ptuning_fast.prompts",),
    ("ptuning_fast.integrations",),
    ("ptuning_fast.cli",),
)


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, whether it is a package's __init__)."""
    found = {}
    for folder, package in SOURCES:
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imports(modules: dict) -> dict[str, set[str]]:
    """Module -> the package modules it imports (anywhere in its file)."""
    graph = {}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1]
                                    + ([node.module] if node.module else []))
                else:
                    base = node.module
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:       # `from . import attention`
                        targets.add(f"{base}.{alias.name}")
                    elif base in modules:                       # a name defined in `base`
                        targets.add(base)
        graph[name] = targets - {name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a path back to its start) per strongly connected group of modules."""
    nodes = set(graph)
    edges = {n: sorted(t for t in graph[n] if t in nodes) for n in nodes}
    order, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node):                    # Tarjan's algorithm; the package is small
        order[node] = low[node] = len(order)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in order:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], order[target])
        if low[node] == order[node]:
            group = []
            while not group or group[-1] != node:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(set(group))

    for node in sorted(nodes):
        if node not in order:
            visit(node)
    return [_path_back(edges, group) for group in groups]


def _path_back(edges, group: set[str]) -> list[str]:
    """A shortest import path from the group's first module back to itself (breadth first)."""
    start = min(group)
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in edges[node]:
                if target == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if target in group and target not in previous:
                    previous[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"no path back to {start} in {sorted(group)}")


def _layer_of(module: str) -> int | None:
    for rank, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


GRAPH = _imports(_modules())


def _refuse(circles):
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_the_graph_is_read():
    """The parser sees the imports it must (guards the checks below against reading nothing)."""
    assert "ptuning_fast.integrations.attention" in GRAPH["ptuning_fast.integrations.model"]
    assert "ptuning_fast.ops" in GRAPH["ptuning_fast.integrations.attention"]
    assert "ptuning_fast.kernels.launch" in GRAPH["ptuning_fast.dispatch"]
    # function-level imports (the fused custom ops are imported on first use)
    assert "ptuning_fast.fused.prefix_attention" in GRAPH["ptuning_fast.dispatch"]
    assert "ptuning_fast.fused.prompt_embedding" in GRAPH["ptuning_fast.ops"]


def test_the_circle_finder_names_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _circles(graph) == [["a", "b", "c", "a"]]


def test_no_import_circles():
    _refuse(_circles(GRAPH))


def test_each_layer_imports_only_the_layers_below_it():
    upward = sorted(f"{module} ({LAYERS[_layer_of(module)][0]}) imports {target} "
                    f"({LAYERS[_layer_of(target)][0]})"
                    for module, targets in GRAPH.items() for target in targets
                    if None not in (_layer_of(module), _layer_of(target))
                    and _layer_of(target) > _layer_of(module))
    assert not upward, "imports against design.md's layers: " + "; ".join(upward)
