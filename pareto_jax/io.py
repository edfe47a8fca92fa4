"""Atomic artifact writing: pytrees as .npz, records as JSON, config fingerprints, and the
reports' Markdown tables."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are as readable as any file
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, jax.Array)):
        return to_jsonable(np.asarray(obj).tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else str(v)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> None:
    data = json.dumps(to_jsonable(obj), indent=2, sort_keys=True).encode()
    _atomic_write(Path(path), lambda fh: fh.write(data))


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def _key_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def save_pytree(path: str | os.PathLike, tree: Any, **extra_arrays) -> None:
    """Save the leaves of a pytree (keyed by their paths) atomically as .npz."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    arrays = {f"leaf:{i}:{_key_str(p)}": np.asarray(v) for i, (p, v) in enumerate(leaves)}
    arrays.update({f"extra:{k}": np.asarray(v) for k, v in extra_arrays.items()})

    def write(fh):
        np.savez(fh, **arrays)

    _atomic_write(Path(path), write)


def load_pytree(path: str | os.PathLike, template: Any) -> tuple[Any, dict]:
    """Load a pytree saved by `save_pytree` into the structure of `template`."""
    with np.load(path) as z:
        leaf_keys = sorted(
            (k for k in z.files if k.startswith("leaf:")), key=lambda k: int(k.split(":")[1])
        )
        leaves = [z[k] for k in leaf_keys]
        extra = {k[len("extra:") :]: z[k] for k in z.files if k.startswith("extra:")}
    t_leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(t_leaves) != len(leaves) or any(
        np.shape(a) != np.shape(b) for a, b in zip(t_leaves, leaves)
    ):
        raise ValueError(f"{path}: saved pytree does not match the template's structure or shapes")
    leaves = [np.asarray(v, dtype=np.asarray(t).dtype) for v, t in zip(leaves, t_leaves)]
    return jax.tree_util.tree_unflatten(treedef, leaves), extra


def save_arrays(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Save named arrays atomically as .npz under exactly these keys."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    _atomic_write(Path(path), lambda fh: np.savez(fh, **arrays))


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The named arrays of an .npz written by `save_arrays`."""
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def fingerprint(*objs: Any) -> str:
    """A short stable hash of configs/arrays (used to key stage artifacts)."""
    h = hashlib.sha256()
    for o in objs:
        if isinstance(o, (np.ndarray, jax.Array)):
            a = np.ascontiguousarray(np.asarray(o))
            h.update(str((a.dtype, a.shape)).encode())
            h.update(a.tobytes())
        else:
            h.update(json.dumps(to_jsonable(o), sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


_MD_SPECIAL = str.maketrans(
    {c: "\\" + c for c in "\\`*_[]#|~$"}
    | {"<": "&lt;", ">": "&gt;", "&": "&amp;", "\n": " ", "\r": " "}
)


def md_escape(text) -> str:
    """`text` as literal Markdown: emphasis, links, code, table bars and HTML escaped (a class
    name such as ``a|b`` or ``<script>`` shows as written and cannot break or inject)."""
    return str(text).translate(_MD_SPECIAL)


def _cell(c) -> str:
    s = str(c).replace("\n", " ")
    return re.sub(r"(?<!\\)\|", r"\|", s)  # a bare bar would split the cell


def md_table(header, rows) -> str:
    """A Markdown table (the reports' format): a header row, then one row per item. Cells are
    written as given (they may hold Markdown); a bare ``|`` in a cell is escaped. Pass names
    through `md_escape` first."""
    out = ["| " + " | ".join(map(_cell, header)) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
    return "\n".join(out)
