"""Run folders: each stage's artifacts beside the config that produced them (`Stages`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import io


class Stages:
    """Stage artifacts in a run folder, each next to the config that produced it.

    A stage is finished when ``<name>/stage.json`` exists with the expected fingerprint; that
    marker is written (atomically) only after the stage's own artifacts, so an interrupted stage
    is simply redone. A fingerprint covers the stage's config and its upstream fingerprints, so a
    changed config re-runs that stage and everything downstream, and nothing upstream.
    """

    def __init__(self, root: str | Path, log=None):
        self.root = Path(root)
        self.log = log
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def dir(self, name: str) -> Path:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        return d

    def done(self, name: str, fp: str) -> bool:
        m = self.root / name / "stage.json"
        ok = m.exists() and io.read_json(m).get("fingerprint") == fp
        if ok:
            self.skipped.append(name)
            if self.log:
                print(f"[{name}] finished earlier with the same config: skipped", file=self.log)
        return ok

    def finish(self, name: str, fp: str, config: Any) -> None:
        io.write_json(self.dir(name) / "stage.json", {"fingerprint": fp, "config": config})
        self.ran.append(name)
