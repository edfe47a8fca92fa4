"""The documentation runs: every public entry point has a docstring example and every example
passes (doctest); the README's Python code blocks run; the API reference (docs/api.rst, built in
`.ci/run` by Sphinx with warnings as errors) covers every public name and every module."""

import doctest
import importlib
import pkgutil
import re
import warnings
from pathlib import Path

import pytest

import pareto_jax

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted(m.name for m in pkgutil.walk_packages(pareto_jax.__path__, "pareto_jax."))
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _tests():
    finder = doctest.DocTestFinder()
    out = []
    for m in MODULES:
        for t in finder.find(importlib.import_module(m), m):
            if t.examples and t.name.startswith(m):  # (each docstring once, where it is defined)
                out.append(t)
    return out


@pytest.mark.parametrize("test", _tests(), ids=lambda t: t.name)
def test_docstring_examples_run(test):
    warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    lines: list[str] = []
    result = runner.run(test, out=lines.append)
    assert result.failed == 0, "".join(lines)


def test_every_public_entry_point_has_an_example():
    documented = {t.name.rsplit(".", 1)[-1] for t in _tests()}
    missing = [n for n in pareto_jax.__all__ if n != "__version__" and n not in documented]
    assert missing == []


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """Every ```python block of the README, in order, in one namespace (a block may use the names
    an earlier one made); blocks marked `# not run` are shown only."""
    monkeypatch.chdir(tmp_path)
    text = (ROOT / "README.md").read_text()
    blocks = [(text[: m.start(1)].count("\n"), m.group(1))
              for m in re.finditer(r"```python\n(.*?)```", text, re.S)]
    assert blocks
    ns: dict = {}
    for line, b in blocks:
        if b.lstrip().startswith("# not run"):
            continue
        exec(compile("\n" * line + b, "README.md", "exec"), ns)  # (errors name README's line)


def test_api_reference_covers_every_public_name_and_module():
    api = (ROOT / "docs" / "api.rst").read_text()
    for m in MODULES:
        assert f".. automodule:: {m}\n" in api, f"{m} is not in docs/api.rst"
    for name in pareto_jax.__all__:
        if name != "__version__":
            assert f".{name}`" in api, f"{name} is not in docs/api.rst's table"
