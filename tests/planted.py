"""The planted-fault check: every fault in `tests/_faults.py` must make its tests fail.

    python -m tests.planted            # all faults (what .ci/run runs)
    python -m tests.planted NAME ...   # some of them
    python -m tests.planted --no-baseline   # skip the fault-free run (when the full suite, slow
    tests included, just passed)
    python -m tests.planted --list

First the union of the named tests runs once without a fault and must pass (else a fault would
be "caught" by a test that fails anyway). Then, one fault at a time, its tests run with
``PARETO_JAX_FAULT=NAME`` (planted by tests/conftest.py and the distributed workers) and must
fail (pytest exit code 1: a test failed, not a collection or usage error). Writes a table to
stdout and ``planted.json`` beside the pytest cache; exits 1 if any fault survives.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from _faults import FAULTS  # noqa: E402


def _pytest(tests: list[str], fault: str | None) -> tuple[int, float, str]:
    env = dict(os.environ)
    env.pop("PARETO_JAX_FAULT", None)
    if fault:
        env["PARETO_JAX_FAULT"] = fault
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "", *tests],
        cwd=HERE.parent, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    tail = p.stdout.strip().splitlines()[-1:] or [""]
    return p.returncode, time.perf_counter() - t0, lines[0] if lines else tail[0]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--list"]:
        for name, (what, tests, _) in FAULTS.items():
            print(f"{name:34s} {what}\n{'':34s} caught by {', '.join(tests)}")
        return 0
    baseline = (
        "--no-baseline" not in argv
    )  # (the planted tests include slow ones: .ci/run keeps the baseline)
    argv = [a for a in argv if a != "--no-baseline"]
    names = argv or list(FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        print(f"unknown faults: {unknown}", file=sys.stderr)
        return 2
    tests = sorted({t for n in names for t in FAULTS[n][1]})
    if baseline:
        rc, secs, last = _pytest(tests, None)
        print(f"without a fault: {len(tests)} tests, exit {rc} ({secs:.0f} s)")
        if rc != 0:
            print(f"the tests must pass without a fault first: {last}", file=sys.stderr)
            return 1
    rows, survived = [], []
    for name in names:
        what, tests, _ = FAULTS[name]
        rc, secs, last = _pytest(tests, name)
        caught = rc == 1
        rows.append(
            {"fault": name, "what": what, "tests": tests, "exit": rc, "caught": caught,
                "seconds": round(secs, 1), "failure": last}
        )
        print(
            f"{'caught  ' if caught else 'SURVIVED'} {name:34s} exit {rc}  {secs:5.0f} s  "
            f"{last[:170]}"
        )
        if not caught:
            survived.append(name)
    out = HERE.parent / ".pytest_cache" / "planted.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(
        f"{len(rows) - len(survived)}/{len(rows)} faults caught"
        + (f"; survived: {survived}" if survived else "")
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
