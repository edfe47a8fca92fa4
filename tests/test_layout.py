"""The package's layout stays as designed: no import cycle, no private name used across modules
(in the package, its tests or its benchmarks), no function longer than 80 lines.

Every import counts, including those inside functions (a lazy import is how a cycle hides).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pareto_jax"
MAX_FUNCTION_LINES = 80

# A module may import from its own layer and the layers above it in this list, never below
# (the README's "What is inside" table lists the same layers).
LAYERS = [
    {"checks", "io", "cache"},
    {"data", "text", "datasets"},
    {"kernels", "linsolve", "kfac", "closed_form", "models", "pareto", "pareto.ceiling",
     "pareto.dual", "pareto.exact", "pareto.frontier", "pareto.highs", "pareto.program",
     "pareto.select", "pareto.simplex"},
    {"train"},
    {"backend", "distributed"},
    {"influence"},
    {"evaluation", "search"},
    {"pipeline", "experiments", "study", "reproduce", "plots", "cli"},
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(current: str, is_pkg: bool, level: int, module: str | None) -> str:
    base = current.split(".")
    base = base if is_pkg else base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported name or None, line) for every package-internal import."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pareto_jax"):
                    yield a.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = (_resolve(name, is_pkg, node.level, node.module) if node.level
                      else (node.module or ""))
            if not target.startswith("pareto_jax"):
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in modules:  # `from . import kernels`: an edge to that module
                    yield sub, None, node.lineno
                else:
                    yield target, a.name, node.lineno


def _graph():
    modules = _modules()
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            if target != name and target in modules:
                graph[name].add(target)
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = _graph()
    # packages import their own submodules to re-export them; that is not a cycle of modules
    for name in list(graph):
        if (PKG / Path(*name.split(".")[1:]) / "__init__.py").exists() or name == "pareto_jax":
            graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    assert _cycles(graph) == []


def test_imports_point_up_the_layers():
    layer = {f"pareto_jax.{m}": i for i, names in enumerate(LAYERS) for m in names}
    graph = _graph()
    graph.pop("pareto_jax", None)
    assert set(graph) == set(layer), "every module belongs to one layer"
    wrong = [f"{m} (layer {layer[m]}) imports {t} (layer {layer[t]})"
             for m, targets in graph.items() for t in targets if t in layer and layer[t] > layer[m]]
    assert wrong == []


def _private_uses(path: Path, name: str, modules: dict[str, Path]):
    """Private names this file takes from another package module: `from m import _x` and
    `alias._x` where alias is a package module bound by an import."""
    tree = ast.parse(path.read_text())
    aliases = {}
    found = []
    for target, imported, line in _imports(name, path, modules):
        if imported is not None and imported.startswith("_") and not imported.startswith("__"):
            found.append(f"{path.relative_to(ROOT)}:{line}: from {target} import {imported}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = (_resolve(name, path.name == "__init__.py", node.level, node.module) if node.level
                    else (node.module or ""))
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pareto_jax"):
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in aliases
                and aliases[node.value.id] != name):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_no_private_name_crosses_a_module():
    modules = _modules()
    files = {**modules}
    for folder in ("tests", "bench"):
        files.update({f"{folder}.{p.stem}": p for p in (ROOT / folder).glob("*.py")})
    # the planted faults replace internals on purpose (tests/planted.py): the one exemption
    files.pop("tests._faults")
    found = [f for name, path in files.items() for f in _private_uses(path, name, modules)]
    assert found == []


def test_functions_are_short():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n >= MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert long == []


@pytest.mark.parametrize("source, expect", [
    ("from pareto_jax.kernels import _structure\n", 1),
    ("from pareto_jax import kernels\nkernels._flat_fns\n", 1),
    ("from pareto_jax import kernels\nkernels.flatten\n", 0),
])
def test_the_private_name_check_can_fail(tmp_path, source, expect):
    """The checker itself: it must see both forms of a cross-module private use."""
    p = ROOT / "tests" / "_layout_probe.py"
    p.write_text(source)
    try:
        assert len(_private_uses(p, "tests._layout_probe", _modules())) == expect
    finally:
        p.unlink()


def test_the_cycle_check_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
