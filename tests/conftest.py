"""Shared fixtures and tolerances (one place for both, STYLE §12)."""

import os
import warnings

os.environ.setdefault("XLA_FLAGS", "")
warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tolerances used across the suite.
RTOL_F64 = 1e-6      # float64 comparisons against references
ATOL_F64 = 1e-9
RTOL_F32 = 1e-4      # float32 invariance checks (chunking, jit vs no-jit)


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
