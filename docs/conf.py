"""Sphinx configuration of the pareto_jax documentation: the method note, the API reference
(generated from the docstrings: autodoc with napoleon for their Google style) and the rendered
notebooks (myst-nb, not executed here: `python -m tests.render_notebooks` executes them).

Sphinx is what JAX, flax and optax build their references with (autodoc over Google-style
docstrings), so the reference reads like theirs. Built in `.ci/run` with warnings as errors and a
fresh environment: ``sphinx-build -E -W --keep-going -b html docs docs/_build/html`` (no network:
no intersphinx).
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
os.environ.setdefault("PARETO_JAX_COMPILATION_CACHE", "0")

project = "pareto_jax"
author = "the pareto_jax developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "myst_nb"]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb", ".rst": "restructuredtext"}
exclude_patterns = ["_build", "figures", "api/_build", "study"]  # study: a report the README links
nb_execution_mode = "off"  # the notebooks in docs/notebooks are stored executed, with outputs
myst_enable_extensions = ["dollarmath"]
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_typehints = "none"  # the docstrings state the types and shapes
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a dataclass's Attributes section as fields, not a second description
# a name in a docstring's prose may match several objects (θ of two records): no cross-reference
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "ref.python"]
html_theme = "alabaster"


def _escape_bars(app, what, name, obj, options, lines):
    """The docstrings write |x| for absolute values and norms, which reStructuredText reads as a
    substitution: escape every bar (the docstrings hold no RST tables)."""
    for i, line in enumerate(lines):
        if "|" in line:
            lines[i] = line.replace("|", "\\|")


def setup(app):
    app.connect("autodoc-process-docstring", _escape_bars)
