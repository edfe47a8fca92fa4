"""Run folders: each stage's artifacts beside the config that produced them (`Stages`).

A run folder is marked as pareto_jax's (`MARKER`); a folder that holds other files is never
written into (`claim`). A stage is finished when ``<name>/stage.json`` exists with the expected
fingerprint and every artifact it lists still has the SHA-256 it was written with: a missing,
truncated, edited or unreadable artifact makes the stage run again (the log says which file and
why), it is never used and never a crash. A fingerprint covers the stage's config, the content of
its inputs (the data's bytes) and its upstream fingerprints, so a changed config or changed data
re-runs that stage and everything downstream; a stage that runs clears the markers of the stages
after it (`ORDER`, and the side branches off it, `BRANCHES`) and the run's summary, so nothing
downstream of a rerun or a failure is ever read as current.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from . import checks, io

MARKER = ".pareto-jax-run"
ORDER = ("train", "influence", "ceiling", "program", "search", "retrain")
# stages on a side branch: each depends on the chain up to its parent only (the yardstick's
# baselines need the trained model and P, not the program's weights)
BRANCHES = {"baselines": "ceiling"}


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def claim(root: Path, flag: str = "--out") -> None:
    """Make `root` a run folder: create it, or reuse one marked as a run folder; refuse a folder
    that holds anything else (the user's files are never overwritten)."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        checks.fail(
            flag, f"{root}, which is a file", "a folder for the run", "choose a new folder name"
        )
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists():
        shown = sorted(p.name for p in root.iterdir())[:5]
        checks.fail(flag,
            f"{root}, a folder holding files that are not a pareto-jax run ({', '.join(shown)})",
            "a new or empty folder, or a folder an earlier run wrote",
            "choose another folder (or leave --out out: runs/<dataset>-<model>-<hash>)")
    root.mkdir(parents=True, exist_ok=True)
    if not (root / MARKER).exists():
        io.write_json(root / MARKER, {"what": "a pareto-jax run folder"})


def write_if_changed(path: Path, obj: Any) -> None:
    """Write JSON only when the content changes (a finished run folder may be read-only)."""
    data = json.loads(json.dumps(io.to_jsonable(obj), sort_keys=True, default=str))
    try:
        if io.read_json(path) == data:
            return
    except (OSError, ValueError):
        pass
    io.write_json(path, obj)


class Stages:
    """Stage artifacts in a run folder (module docstring)."""

    def __init__(self, root: str | Path, log=None):
        self.root = Path(root)
        self.log = log
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _say(self, name: str, what: str) -> None:
        if self.log:
            print(f"[{name}] {what}", file=self.log)

    def done(self, name: str, fp: str) -> bool:
        """Whether stage `name` finished with fingerprint `fp` and its artifacts are intact."""
        m = self.root / name / "stage.json"
        if not m.exists():
            return False
        try:
            rec = io.read_json(m)
            arts = rec.get("artifacts", {})
        except (OSError, ValueError, AttributeError):
            self._say(name, f"{m} is unreadable: running the stage again")
            return False
        if rec.get("fingerprint") != fp:
            return False
        for rel, digest in arts.items():
            p = self.root / rel
            if not p.exists():
                self._say(name, f"{p} is missing: running the stage again")
                return False
            if file_hash(p) != digest:
                self._say(name,
                    f"{p} changed since it was written (damaged or edited): running the stage again"
                )
                return False
        self.skipped.append(name)
        self._say(name, "finished earlier with the same config and data: skipped")
        return True

    def start(self, name: str) -> None:
        """Stage `name` is about to run: the stages after it and the summary are no longer current
        (their markers are removed)."""
        later = ORDER[ORDER.index(name) + 1 :] if name in ORDER else ()
        later += tuple(b for b, parent in BRANCHES.items() if parent in later or parent == name)
        for other in later:
            (self.root / other / "stage.json").unlink(missing_ok=True)
        (self.root / "summary.json").unlink(missing_ok=True)
        m = self.root / name / "stage.json"
        m.unlink(missing_ok=True)

    def finish(self, name: str, fp: str, config: Any, artifacts=()) -> None:
        """Mark stage `name` finished: its fingerprint, config and each artifact's SHA-256."""
        arts = {str(Path(a).relative_to(self.root)): file_hash(Path(a)) for a in artifacts}
        io.write_json(
            self.dir(name) / "stage.json", {"fingerprint": fp, "config": config, "artifacts": arts}
        )
        self.ran.append(name)

    def fingerprints(self) -> dict:
        """The fingerprint of every finished stage (the chain a summary belongs to)."""
        out = {}
        for name in ORDER + tuple(BRANCHES):
            m = self.root / name / "stage.json"
            try:
                out[name] = io.read_json(m)["fingerprint"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out
