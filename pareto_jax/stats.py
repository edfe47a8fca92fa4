"""The statistics every report shares: the exact paired McNemar test and the t-interval."""

from __future__ import annotations

import numpy as np


def mcnemar(method_correct, ref_correct) -> dict:
    """Exact McNemar test on paired outcomes: b = samples only the method gets right, c = only
    the reference; under no difference each discordant pair is a fair coin, so the two-sided
    p-value is the binomial test of b in b + c. Pooling discordant pairs over seeds (strata)
    keeps the test exact."""
    import scipy.stats

    m, r = np.asarray(method_correct, bool), np.asarray(ref_correct, bool)
    if m.shape != r.shape:
        raise ValueError(f"paired outcomes of different shapes {m.shape} and {r.shape}")
    b, c = int(np.sum(m & ~r)), int(np.sum(~m & r))
    p = float(scipy.stats.binomtest(b, b + c, 0.5).pvalue) if b + c else 1.0
    return {"gained": b, "lost": c, "net": b - c, "p": p}


def class_mcnemar(method_correct, ref_correct, y, num_classes: int) -> list[float]:
    """Per class k, the `mcnemar` p-value on the samples of class k."""
    m, r, y = np.asarray(method_correct, bool), np.asarray(ref_correct, bool), np.asarray(y)
    return [mcnemar(m[y == k], r[y == k])["p"] for k in range(num_classes)]


def interval(values, level: float = 0.95) -> dict:
    """Mean and the half-width of its t-interval over seeds (0 with one seed)."""
    import scipy.stats

    v = np.asarray(values, np.float64)
    n = v.size
    if n == 0:
        return {"mean": float("nan"), "half_width": float("nan"), "n": 0}
    hw = (
        float(scipy.stats.t.ppf(0.5 + level / 2, n - 1) * v.std(ddof=1) / np.sqrt(n))
        if n > 1
        else 0.0
    )
    return {"mean": float(v.mean()), "half_width": hw, "n": int(n)}
