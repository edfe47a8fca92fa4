"""The package's layout stays as designed: no import cycle, no private name used across modules
(in the package, its tests or its benchmarks), no function longer than 80 lines of code (its
docstring not counted), no module longer than 500 lines, no config field that nothing reads,
and each default (damping, weight decay, w_max, ρ) and each solver vocabulary written in one
place, `pareto_jax/config`.

Every import counts, including those inside functions (a lazy import is how a cycle hides).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pareto_jax"
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500

# A module may import from its own layer and the layers above it in this list, never below
# (the README's "What is inside" table lists the same layers).
LAYERS = [
    {"checks", "io", "cache", "config", "config.vocabulary", "config.stages", "config.jobs",
     "results", "stats"},
    {"data", "data.records", "data.files", "text", "datasets"},
    {"kernels", "linsolve", "kfac", "kfac.layers", "kfac.factors", "kfac.solve", "closed_form",
     "models", "pareto", "pareto.ceiling", "pareto.device", "pareto.dual", "pareto.exact",
     "pareto.frontier",
     "pareto.highs", "pareto.program", "pareto.select", "pareto.simplex"},
    {"train", "metrics", "setup"},
    {"backend", "distributed", "sharded"},
    {"influence", "influence.front", "influence.validation", "influence.curvature",
     "influence.solvers", "influence.result", "influence.stages", "influence.unroll",
     "influence.selection"},
    {"evaluation", "search", "rounds", "yardstick"},
    {"pipeline", "runs", "report", "experiments", "study", "study_settings", "study_report",
     "reproduce", "reproduce.common", "reproduce.synthetic", "reproduce.deletion",
     "reproduce.improve", "plots", "cli", "cli_parser"},
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
            target = (
                _resolve(name, is_pkg, node.level, node.module)
                if node.level
                else (node.module or "")
            )
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
    wrong = [
        f"{m} (layer {layer[m]}) imports {t} (layer {layer[t]})"
        for m, targets in graph.items()
        for t in targets
        if t in layer and layer[t] > layer[m]
    ]
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
            base = (
                _resolve(name, path.name == "__init__.py", node.level, node.module)
                if node.level
                else (node.module or "")
            )
            for a in node.names:
                if f"{base}.{a.name}" in modules:
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("pareto_jax"):
                    aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and aliases[node.value.id] != name
        ):
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


def _code_lines(node) -> int:
    """A function's lines without its docstring (its documentation and example are not code)."""
    n = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
            and isinstance(first.value.value, str):
        n -= first.end_lineno - first.lineno + 1
    return n


def test_functions_are_short():
    long = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node)
                if n >= MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert long == []


@pytest.mark.parametrize(
    "source, expect",
    [("from pareto_jax.kernels import _structure\n", 1),
        ("from pareto_jax import kernels\nkernels._flat_fns\n", 1),
        ("from pareto_jax import kernels\nkernels.flatten\n", 0)],
)
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


def test_modules_are_short():
    long = [
        f"{p.relative_to(ROOT)}: {n} lines"
        for p in PKG.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert long == []


# ----------------------------------------------------------------------------- configs

CONFIG = PKG / "config"


def _config_fields(source: str) -> dict[str, list[str]]:
    """{class name: its dataclass fields} of the `@dataclasses.dataclass` classes in source."""
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and any(
            "dataclass" in ast.unparse(d) for d in node.decorator_list
        ):
            out[node.name] = [
                st.target.id
                for st in node.body
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)
            ]
    return out


def _attribute_reads(sources) -> dict[str, int]:
    """How often each attribute name is read (``x.name`` in a load context, or
    ``getattr(x, "name")``) in these sources, outside the config records' own bodies."""
    counts: dict[str, int] = {}
    for src in sources:
        for node in ast.walk(ast.parse(src)):
            name = None
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                name = node.attr
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                name = node.args[1].value
            if name:
                counts[name] = counts.get(name, 0) + 1
    return counts


def _unread_fields(config_sources, other_sources) -> list[str]:
    fields = {}
    for src in config_sources:
        fields.update(_config_fields(src))
    # reads inside the config package count only outside the records' validation (e.g. a
    # property of one record reading another's field, ReweightConfig.bounds reading rho)
    reads = _attribute_reads(other_sources)
    for src in config_sources:
        for node in ast.parse(src).body:
            if isinstance(node, ast.ClassDef):
                for fn in node.body:
                    if isinstance(fn, ast.FunctionDef) and fn.name != "__post_init__":
                        for k, v in _attribute_reads([ast.unparse(fn)]).items():
                            reads[k] = reads.get(k, 0) + v
    return [f"{cls}.{f}" for cls, names in fields.items() for f in names if not reads.get(f)]


def test_every_config_field_is_read_somewhere():
    """A config field that nothing reads is a knob that does nothing (ReweightConfig.rtol and
    max_iter once were): every field of every record in `pareto_jax/config` must be read by
    the code that runs (an attribute read outside the records' own validation)."""
    config_sources = [p.read_text() for p in CONFIG.glob("*.py")]
    others = [p.read_text() for p in PKG.rglob("*.py") if CONFIG not in p.parents]
    assert _unread_fields(config_sources, others) == []


def test_the_dead_field_check_can_fail():
    config = (
        "import dataclasses\n@dataclasses.dataclass(frozen=True)\nclass C:\n    used: int = 1\n"
        "    unused_knob: float = 2.0\n    def __post_init__(self):\n        "
        "check(self.unused_knob)\n"
    )
    assert _unread_fields([config], ["def f(c):\n    return c.used\n"]) == ["C.unused_knob"]


# the names whose default is written once, in pareto_jax/config
ONE_PLACE = ("damping", "weight_decay", "w_max", "rho")


def _literal_defaults(path: Path) -> list[str]:
    """Parameter defaults and class-level field defaults that are numeric literals, for the names
    of ONE_PLACE."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        pairs = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            pos = a.posonlyargs + a.args
            pairs += list(zip(pos[len(pos) - len(a.defaults) :], a.defaults))
            pairs += [(k, d) for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            pairs = [(arg.arg, d) for arg, d in pairs]
        elif isinstance(node, ast.ClassDef):
            pairs = [
                (st.target.id, st.value)
                for st in node.body
                if isinstance(st, ast.AnnAssign)
                and isinstance(st.target, ast.Name)
                and st.value is not None
            ]
        for name, default in pairs:
            if (
                name in ONE_PLACE
                and isinstance(default, ast.Constant)
                and isinstance(default.value, (int, float))
                and not isinstance(default.value, bool)
            ):
                found.append(f"{path.relative_to(ROOT)}:{default.lineno} {name}={default.value!r}")
    return found


def _vocabulary_literals(path: Path, names: set[str]) -> list[str]:
    """Tuples, lists or sets of string literals holding two or more of `names` (a vocabulary
    written out again)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            vals = {
                e.value
                for e in node.elts
                if isinstance(e, ast.Constant) and isinstance(e.value, str)
            }
            if len(vals & names) >= 2:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(vals)}")
    return found


def test_defaults_and_solver_names_are_defined_in_one_place():
    """`damping`, `weight_decay`, `w_max` and `rho` get a literal default only in the config
    package (everywhere else they are required, or default to the config class's attribute),
    and the solver vocabularies are written out only there (`config.vocabulary`)."""
    from pareto_jax.config import vocabulary

    outside = [p for p in PKG.rglob("*.py") if CONFIG not in p.parents]
    assert [d for p in outside for d in _literal_defaults(p)] == []
    inside = [d for p in CONFIG.glob("*.py") for d in _literal_defaults(p)]
    for name in ("damping", "weight_decay", "w_max"):  # each written once there
        assert len([d for d in inside if f" {name}=" in d]) <= 1, inside
    names = set(vocabulary.SOLVERS) | set(vocabulary.PROGRAM_SOLVERS) | {"simplex", "dual"}
    assert [v for p in outside for v in _vocabulary_literals(p, names)] == []


def test_the_one_place_checks_can_fail(tmp_path):
    p = tmp_path / "probe.py"
    p.write_text("def f(x, *, damping=1e-3, w_max=2.0, rho=None):\n    return ('cg', 'dense')\n")
    probe_root = ROOT  # (paths are reported relative to the repository)
    q = ROOT / "tests" / "_one_place_probe.py"
    q.write_text(p.read_text())
    try:
        assert len(_literal_defaults(q)) == 2
        assert len(_vocabulary_literals(q, {"cg", "dense"})) == 1
    finally:
        q.unlink()
    del probe_root
