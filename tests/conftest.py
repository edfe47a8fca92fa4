"""Shared fixtures and tolerances (one place for both, STYLE §12)."""

import os
import warnings

os.environ.setdefault("XLA_FLAGS", "")
# the suite compiles from scratch, as on a clean CI machine (tests/test_cache.py tests the cache)
os.environ.setdefault("PARETO_JAX_COMPILATION_CACHE", "0")
warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

import _faults  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import Phase, settings  # noqa: E402

# Property tests: "ci" (the default, what .ci/run uses) draws the same examples on every run
# (derandomized), so CI passes or fails on the code, not on chance; "explore" draws fresh
# examples, ten times as many (HYPOTHESIS_PROFILE=explore python -m pytest -q tests/ -k property
# -k highs). Every failure found there is kept as an explicit @example in its test.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
# with a planted fault only whether a test fails matters: no shrinking of the failing example
settings.register_profile("planted", derandomize=True, phases=(Phase.explicit, Phase.generate))
PROFILE = os.environ.get(
    "HYPOTHESIS_PROFILE", "planted" if os.environ.get("PARETO_JAX_FAULT") else "ci"
)
settings.load_profile(PROFILE)


def examples(n: int) -> int:
    """A property test's example count under the active profile."""
    return 10 * n if PROFILE == "explore" else n


# a planted fault (tests/planted.py) goes in before any test module imports the package
_faults.plant()



@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """XLA:CPU maps memory for each compiled program and keeps it while the program is cached:
    the whole suite in one process passed Linux's default limit of 65,530 memory maps
    (vm.max_map_count; measured 65,396 at the crash) and segfaulted inside a compile. Each test
    module leaves with the compiled programs released."""
    yield
    jax.clear_caches()


# Tolerances used across the suite.
RTOL_F64 = 1e-6  # float64 comparisons against references
ATOL_F64 = 1e-9
RTOL_F32 = 1e-4  # float32 invariance checks (chunking, jit vs no-jit)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.fixture(scope="session")
def digits_splits():
    from pareto_jax import data

    return data.stratified_split(data.load_digits(), seed=0)


def tiny_classification(n=60, d=5, k=3, seed=0, dtype=np.float64):
    """Small Gaussian blobs: features (n, d), labels (n,) with every class present."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(0, 2, (k, d))
    x = centres[y] + rng.normal(0, 1, (n, d))
    return x.astype(dtype), y.astype(np.int32)
