"""The notebooks run top to bottom; notebooks/ is stored without outputs and docs/notebooks/
holds the executed copies (`python -m tests.render_notebooks`), checked here to be current."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_four_notebooks():
    assert len(NOTEBOOKS) == 4


# every notebook runs with -m slow (20 s to a few minutes each; the quickstart's steps are the
# CLI run's, which the default suite runs; the default suite's budget); the check above runs always
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "stored with outputs"
    )
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_rendered_copy_is_current_and_shows_results(path):
    """docs/notebooks/ holds each notebook executed, with outputs (what a reader opens); it must
    come from the notebook's current cells (re-render with ``python -m tests.render_notebooks``)."""
    from tests.render_notebooks import DST, source_sha

    copy = DST / path.name
    assert copy.exists(), f"no rendered copy: run python -m tests.render_notebooks {path.stem}"
    src, out = nbformat.read(path, as_version=4), nbformat.read(copy, as_version=4)
    assert out.metadata.get("pareto_jax", {}).get("source_sha256") == source_sha(src), (
        f"stale rendered copy: run python -m tests.render_notebooks {path.stem}"
    )
    outputs = [o for c in out.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
