"""The first-order Pareto frontier of per-class gains within a trust region (``docs/method.md``).

For class weightings β (each class alone, then random Dirichlet mixtures), the program
max Σ_k β_k Σ_i (w_i − 1) P[i, k] subject to no class predicted worse (α = 1) and
|w_i − 1| <= ρ; the one-hot rows give each class's estimated first-order ceiling.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .. import checks
from ..config import TRUST_REGION
from ..results import pytree_result
from .program import ReweightConfig, solve_reweighting


@pytree_result(data=("class_weights", "gains", "weights", "ceiling"))
@dataclasses.dataclass(frozen=True)
class FrontierResult:
    """First-order Pareto frontier of per-class loss decreases within a trust region.

    Attributes:
        class_weights: (M, K) the weightings β swept (one-hot rows first).
        gains: (M, K) predicted loss decrease per class, Pᵀ(w − 1), at each frontier point.
        weights: (M, N) the weights at each point.
        ceiling: (K,) the largest predicted loss decrease of each class with no class
            predicted worse (the one-hot rows): an estimated first-order ceiling per class.
        rho: the trust region used.
    """

    class_weights: np.ndarray
    gains: np.ndarray
    weights: np.ndarray
    ceiling: np.ndarray
    rho: float


def pareto_frontier(P, *, rho: float = TRUST_REGION, n_random: int = 8, seed: int = 0,
    solver: str = ReweightConfig.solver) -> FrontierResult:
    """Trace the first-order frontier: for weightings β (each class alone, then random
    Dirichlet mixtures) solve max Σ_k β_k Σ_i (w_i − 1) P[i, k] s.t. no class is predicted
    worse (Pᵀ(w − 1) >= 0, i.e. α = 1) and |w_i − 1| <= ρ.

    Example:
        >>> import numpy as np
        >>> from pareto_jax import pareto_frontier
        >>> P = np.random.default_rng(3).normal(size=(120, 2)) + 0.1
        >>> fr = pareto_frontier(P, n_random=2)
        >>> fr.gains.shape, bool((fr.gains >= -1e-9).all())   # no class predicted worse
        ((4, 2), True)
    """
    P = checks.as_influence_matrix(P)
    checks.check_positive(rho, "rho")
    K = P.shape[1]
    rng = np.random.default_rng(seed)
    B = (
        np.concatenate([np.eye(K), rng.dirichlet(np.ones(K), size=n_random)])
        if n_random
        else np.eye(K)
    )
    cfg = ReweightConfig(rho=rho, w_max=1.0 + rho, solver=solver)
    gains, weights = [], []
    for beta in B:
        sol = solve_reweighting(P, None, 1.0, cfg, class_weights=beta)
        if sol.w is None:
            raise checks.NumericalError(
                f"frontier: program failed for β={beta.round(3).tolist()}: {sol.message}"
            )
        gains.append(P.T @ (sol.w - 1.0))
        weights.append(sol.w)
    G = np.stack(gains)
    return FrontierResult(B, G, np.stack(weights), np.diag(G[:K]).copy(), float(rho))
