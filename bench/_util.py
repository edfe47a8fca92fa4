"""Benchmark helpers: timing without compilation, peak-memory probes, subprocess isolation."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def block(x):
    import jax

    return jax.tree_util.tree_map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x
    )


def timeit(fn, *, repeats: int = 3, warmup: int = 1) -> float:
    """Best wall time of `fn()` over `repeats`, after `warmup` calls (compilation excluded)."""
    for _ in range(warmup):
        block(fn())
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - t)
    return best


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def rss() -> int:
    return _status("VmRSS")


def reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux); True if it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak() -> int:
    return _status("VmHWM")


def measure_peak(fn) -> int:
    """Extra resident memory (bytes) that one call of `fn` needs above the current RSS."""
    block(fn())  # compile outside the measurement
    base = rss()
    if not reset_peak():
        return -1
    block(fn())
    return max(peak() - base, 0)


def xla_memory(jitted, *args) -> int:
    """Bytes XLA plans for one call beyond its inputs (temporaries + outputs), from the compiled
    executable's memory analysis; -1 where the backend does not report it."""
    try:
        m = jitted.lower(*args).compile().memory_analysis()
        return int(m.temp_size_in_bytes + m.output_size_in_bytes)
    except Exception:  # pragma: no cover - backend dependent
        return -1


def in_subprocess(module: str, case: dict, timeout: int = 3600) -> dict:
    """Run `python -m module --case JSON` in a fresh process and parse its JSON line."""
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", module, "--case", json.dumps(case)],
        capture_output=True, text=True, timeout=timeout, env=env,
        cwd=Path(__file__).resolve().parent.parent)
    lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
    if p.returncode != 0 or not lines:
        return {**case, "error": (p.stderr or p.stdout)[-2000:]}
    return json.loads(lines[-1])


def machine() -> dict:
    import jax

    return {"python": platform.python_version(), "jax": jax.__version__,
        "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
        "platform": platform.platform()}


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"{name}.json"
    p.write_text(json.dumps(payload, indent=2))
    return p


def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    out = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(fmt(r.get(c, "")).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out)
