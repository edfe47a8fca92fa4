"""The persistent compilation cache (`pareto_jax.cache`): on by default in a user folder, off on
request, the user's own folder respected, and a second process reuses what the first compiled."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import time, numpy as np
from pareto_jax import pareto
P = (np.random.default_rng(0).normal(size=(3000, 4)) + 0.05) * 1e-3
t = time.perf_counter(); r = pareto.solve_reweighting(P, [0], 0.9)
print(r.status, time.perf_counter() - t)
"""


CHOICE = """
import os, sys, jax
from pareto_jax import cache
tmp = sys.argv[1]
os.environ["PARETO_JAX_COMPILATION_CACHE"] = "0"
assert cache.enable() is None
os.environ["PARETO_JAX_COMPILATION_CACHE"] = "1"
os.environ["PARETO_JAX_CACHE_DIR"] = tmp + "/c"
jax.config.update("jax_compilation_cache_dir", None)
assert str(cache.enable()) == tmp + "/c" and os.path.isdir(tmp + "/c")
jax.config.update("jax_compilation_cache_dir", tmp + "/mine")
assert str(cache.enable()) == tmp + "/mine"  # the user's own choice stands
print("ok")
"""


def test_cache_folder_choice(tmp_path):
    # in a subprocess: the suite's own process never turns the cache on (a process whose cache
    # settings were switched back and forth crashed later inside XLA's compiler, twice)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CHOICE, str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_second_process_reuses_the_compiled_program(tmp_path):
    env = {**os.environ, "PARETO_JAX_COMPILATION_CACHE": "1", "PARETO_JAX_CACHE_DIR": str(tmp_path),
           "PYTHONPATH": str(ROOT)}
    runs = [subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    first, second = (float(r.stdout.split()[-1]) for r in runs)
    assert [r.stdout.split()[0] for r in runs] == ["0", "0"]
    assert any(tmp_path.iterdir())  # something was written
    assert second < first  # (timing only as an order: the cached run skips a multi-second compile)
