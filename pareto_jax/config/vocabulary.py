"""The names every choice may take, and the shared constants (defined once, here)."""

from __future__ import annotations

# ----------------------------------------------------------------------------- vocabularies

# inverse-curvature solvers of the influence stage (`pareto_jax.influence.solvers`)
SOLVERS = ("cg", "dense", "lissa", "kfac", "ekfac")
PRECONDITIONERS = ("none", "kfac", "ekfac")
CURVATURES = ("auto", "hessian", "gauss_newton")
ROW_METHODS = ("auto", "jvp", "per_sample")
EXECUTIONS = ("auto", "compiled", "stepped")
# K-FAC / EK-FAC's output side: the exact expectation over the K classes (K backward passes per
# batch), or one label drawn per sample from the model (one backward pass; Kronfluence's default)
FISHERS = ("expected", "sampled")
# the reweighting program and the ceiling test: on the device (pure JAX), or HiGHS on the host
PROGRAM_SOLVERS = ("device", "highs")
OPTIMIZERS = ("adam", "sgd", "gd")
NORMALIZERS = ("weights", "n")
MODEL_KINDS = ("linear", "mlp", "cnn")
DATASETS = ("digits", "mnist5k", "disks-separable", "disks-overlapping", "emotion", "ag_news",
    "cifar10", "stl10", "npz")
TEXT_FEATURES = ("tfidf", "minilm")
RETRAIN = ("epoch", "converge")
# how the product (`run`, the experiments, the study) computes P for a deep model: EK-FAC
# (default), K-FAC, or Gauss-Newton CG (`InfluenceConfig.for_product`)
PRODUCT_INFLUENCE = ("ekfac", "kfac", "cg")

# the closed form's and the exact reference's damping: none
NO_DAMPING = 0.0
# damping "auto": this fraction of the mean eigenvalue of the objective's curvature, tr(H + λI)/P,
# and never below the floor
AUTO_DAMPING_FRACTION, AUTO_DAMPING_FLOOR = 1e-4, 1e-8

# the trust region |w_i − 1| <= ρ of the main job and of the frontier
TRUST_REGION = 0.5


def weight_bounds(w_max, rho, *, maximum=max, minimum=min):
    """(lo, hi) of every weight: [0, w_max] intersected with the trust region [1 − ρ, 1 + ρ]
    (ρ None: off). The one place these bounds are computed: the host configs call it with
    Python's max/min, `pareto.reweight` with ``jnp.maximum``/``jnp.minimum`` on traced values."""
    lo, hi = 0.0, w_max
    if rho is not None:
        lo, hi = maximum(lo, 1.0 - rho), minimum(hi, 1.0 + rho)
    return lo, hi
