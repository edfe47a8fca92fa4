"""Execute the notebooks and keep the executed copies, with their outputs, in docs/notebooks/.

    python -m tests.render_notebooks [NAME ...]

The notebooks in notebooks/ are stored without outputs (clean diffs); a reader opens the
rendered copies in docs/notebooks/. Each copy records the hash of the notebook's cells it was run
from (metadata ``pareto_jax.source_sha256``), and ``tests/test_notebooks.py`` fails when a copy is
stale, so the rendered results always belong to the notebook as it is.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
SRC, DST = ROOT / "notebooks", ROOT / "docs" / "notebooks"


def source_sha(nb) -> str:
    h = hashlib.sha256()
    for c in nb.cells:
        h.update(c.cell_type.encode() + b"\0" + c.source.encode() + b"\0")
    return h.hexdigest()


def render(path: Path) -> Path:
    nb = nbformat.read(path, as_version=4)
    sha = source_sha(nb)
    t0 = time.time()
    NotebookClient(
        nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(SRC)}}
    ).execute()
    nb.metadata["pareto_jax"] = {"source_sha256": sha, "seconds": round(time.time() - t0, 1)}
    DST.mkdir(parents=True, exist_ok=True)
    out = DST / path.name
    nbformat.write(nb, out)
    return out


if __name__ == "__main__":
    names = sys.argv[1:]
    for p in sorted(SRC.glob("*.ipynb")):
        if not names or p.stem in names or p.name in names:
            print(render(p), flush=True)
