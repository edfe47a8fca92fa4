"""Category-wise influence functions: the front door (validation, algorithm choice, backend).

The influence of training sample z_i on class k is

    P[i, k] = (1/N) · ∇L(S^k; θ)ᵀ (H + δI)⁻¹ ∇ℓ(z_i; θ),

where L(S^k) is the mean loss over the validation samples of class k and H is the Hessian (or
Gauss-Newton matrix) of the training objective L_T(θ) = (1/N) Σ_i ℓ(z_i; θ) + (λ/2)‖θ‖².
**P > 0 means beneficial**: up-weighting z_i by ε changes class k's validation loss by −ε·P[i, k]
(to first order), and removing z_i raises it by about P[i, k]. The derivation and sign
convention are in ``docs/method.md``.

Only K inverse-Hessian solves are needed (one per class). This module validates input on the
host, picks the algorithm (`InfluenceConfig`) and runs the stages on a backend (`backend.Local`
for one device, `distributed.Sharded` for a mesh); the numerics are `kernels`, the solves
`linsolve` and `kfac`, the closed form for linear heads `closed_form`.

* `category_influence`: the entry point; returns P with diagnostics (`InfluenceResult`).
* `linear_category_influence`: the same for a linear head, by the closed form (the oracle).
* `class_gradients`, `make_hvp`, `influence_from_solutions`, `per_sample_gradients`: the stages
  on their own (validated less; for tests, benchmarks and custom pipelines).
* `predict_class_loss_change`: the first-order effect of a weighting on each class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import checks, closed_form, distributed, kernels, kfac, linsolve
from .backend import Local
from .kernels import Curvature

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

JOINT_POSITIVE, TRADE_OFF, JOINT_NEGATIVE = 1, 0, -1
REGION_NAMES = {JOINT_POSITIVE: "joint-positive", TRADE_OFF: "trade-off", JOINT_NEGATIVE: "joint-negative"}


def _backend(mesh, execution: str = "auto"):
    return Local(execution) if mesh is None else distributed.Sharded(mesh)


# ----------------------------------------------------------------------------- the stages


def class_gradients(loss_fn: LossFn, params, x_val, y_val, num_classes: int, *,
                    chunk_size: int = 512, mesh=None) -> jax.Array:
    """g_k = ∇_θ mean_{i: y_i = k} ℓ(z_i; θ) for every class k, as a (K, P) matrix (flat θ).

    One pass over the validation set (`kernels.class_gradients`). Every class must be present
    (validated by `category_influence`; here an absent class gives a zero row). With `mesh`,
    the validation set is sharded over its devices and the result replicated.
    """
    flat = kernels.flatten(loss_fn, params)
    be = _backend(mesh)
    chunks = be.chunks(x_val, y_val, chunk_size, flat.theta.dtype)
    return be.class_gradients(flat.loss, flat.theta, chunks, y_val, num_classes)


def _curvature(loss_fn, params, curvature: str, apply) -> Curvature:
    checks.check_choice(curvature, "curvature", ("hessian", "gauss_newton"))
    f = kernels.flatten(loss_fn, params).loss
    if curvature == "hessian":
        return Curvature(f, None, "hessian")
    if apply is None:
        checks.fail("apply", "None", "the model's apply(params, x_batch) -> logits",
                    "pass apply= for Gauss-Newton curvature")
    return Curvature(f, kernels.flat_logits(apply, params), "gauss_newton")


def cross_entropy_mismatch(loss_fn: LossFn, params, apply, x, y, n: int = 16) -> float:
    """Max relative difference, over the first n samples, between ``loss_fn`` and the softmax
    cross-entropy of ``apply``'s logits (0 when loss_fn is that cross-entropy)."""
    xs, ys = jnp.asarray(x[:n]), jnp.asarray(y[:n])
    ours = jax.vmap(loss_fn, (None, 0, 0))(params, xs, ys)
    ce = optax.softmax_cross_entropy_with_integer_labels(apply(params, xs), ys)
    return float(jnp.max(jnp.abs(ours - ce) / jnp.maximum(jnp.abs(ce), 1e-6)))


def _not_cross_entropy(loss_fn, params, apply, x, y) -> str | None:
    """Why Gauss-Newton / K-FAC would be wrong for this loss (None when loss_fn is the softmax
    cross-entropy of apply's logits, checked on 16 training samples): they use that loss's
    output Hessian diag p − ppᵀ whatever the loss."""
    gap = cross_entropy_mismatch(loss_fn, params, apply, x, y)
    if gap <= 1e-4:
        return None
    return (f"loss_fn is not the softmax cross-entropy of apply's logits (relative difference {gap:.2g} "
            f"on 16 training samples)")


def _refuse(what: str, why: str):
    checks.fail("config", what, "a loss that is softmax cross-entropy of apply's logits for Gauss-Newton / K-FAC / EK-FAC",
                f"{why}; use curvature='hessian' with solver 'cg', 'dense' or 'lissa'")


def _resolve_curvature(config: "InfluenceConfig", loss_fn, params, apply, x, y):
    """(config with its curvature decided, a details note): "auto" takes Gauss-Newton only for a
    cross-entropy loss (`_not_cross_entropy`), else the Hessian (and says so); an explicit
    Gauss-Newton / K-FAC request for another loss is refused, never answered with the wrong
    curvature."""
    ce_based = config.solver in ("kfac", "ekfac") or config.curvature in ("auto", "gauss_newton")
    if apply is None or not ce_based:
        return (dataclasses.replace(config, curvature="hessian") if config.curvature == "auto" else config), {}
    why = _not_cross_entropy(loss_fn, params, apply, x, y)
    if why is None:
        return (dataclasses.replace(config, curvature="gauss_newton") if config.curvature == "auto" else config), {}
    if config.curvature == "auto" and config.solver not in ("kfac", "ekfac"):
        return dataclasses.replace(config, curvature="hessian"), {
            "curvature_note": f"{why}: the Hessian is used, since Gauss-Newton here assumes cross-entropy"}
    _refuse(f"curvature={config.curvature!r}, solver={config.solver!r}", why)


def make_hvp(loss_fn: LossFn, params, x_train, y_train, *, weight_decay: float,
             batch_size: int = 1024, curvature: str = "hessian", apply=None, mesh=None):
    """v -> ∇²L_T(θ) v (flat v), the minibatch-accumulated HVP of the full training objective.

    With ``curvature="gauss_newton"`` the product is Jᵀ H_CE J v + λv, for softmax cross-entropy
    over the logits of ``apply(params, x_batch)`` (PSD by construction; another loss is refused). With `mesh`, the
    training set is sharded and each product `psum`-ed.

    Returns:
        (hvp, theta): v (P,) -> H v (jitted programs, the data passed as jit arguments, never
        captured as constants) and the flat parameter vector.
    """
    curv = _curvature(loss_fn, params, curvature, apply)
    why = None if curvature != "gauss_newton" else _not_cross_entropy(loss_fn, params, apply, x_train, y_train)
    if why is not None:
        _refuse("curvature='gauss_newton'", why)
    theta = kernels.flatten(loss_fn, params).theta
    be = _backend(mesh)
    chunks = be.chunks(x_train, y_train, batch_size, theta.dtype)
    data = be.objective(theta, chunks, np.asarray(x_train).shape[0], weight_decay)
    M = be.matvec(curv, data)
    return (lambda v: M(v[None])[0]), theta


def influence_from_solutions(loss_fn: LossFn, params, U: jax.Array, x_train, y_train, *,
                             method: str = "jvp", chunk_size: int = 256, mesh=None):
    """P[i, k] = (1/N) u_kᵀ ∇ℓ(z_i) from the K solutions U (K, P), for every training sample.

    Args:
        method: "jvp" (forward mode: K directional derivatives of the per-sample loss vector,
            never an N×P gradient matrix) or "per_sample" (chunked `vmap(grad)` contracted with U).
        chunk_size: samples per chunk; memory grows with it, results do not change.
        mesh: shard the training samples over this mesh; the result holds this process's rows.
    """
    checks.check_choice(method, "method", ("jvp", "per_sample"))
    flat = kernels.flatten(loss_fn, params)
    be = _backend(mesh)
    chunks = be.chunks(x_train, y_train, chunk_size, flat.theta.dtype)
    return be.influence_rows(flat.loss, method, flat.theta, U, chunks, np.asarray(x_train).shape[0])


def per_sample_gradients(loss_fn: LossFn, params, x, y) -> jax.Array:
    """All per-sample gradients as an (n, P) matrix (materialised; small problems and tests)."""
    flat = kernels.flatten(loss_fn, params)
    return jax.jit(jax.vmap(jax.grad(flat.loss), (None, 0, 0)))(flat.theta, jnp.asarray(x), jnp.asarray(y))


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
    """Numerical choices for `category_influence` (the problem itself is passed separately).

    Attributes:
        solver: "cg" (default), "dense" (exact reference; small models), "lissa" (see
            `linsolve.solve_lissa`), "kfac" or "ekfac" (see `pareto_jax.kfac`; they need
            `model=`). All go through the same damping rule and escalation.
        preconditioner: "none" (default), "kfac" or "ekfac": CG preconditioned by the K-FAC /
            EK-FAC factors of the model (needs `model=`; one device). The stopping rule stays on
            the true residual of the chosen curvature, so the answer is CG's, only faster.
        curvature: "auto" (default: "gauss_newton" when `apply` is given and `loss_fn` is the
            softmax cross-entropy of its logits, checked on 16 training samples; else
            "hessian", with a note in `details`), "hessian" or "gauss_newton" (PSD; needs
            `apply` and a cross-entropy loss, whose output Hessian it uses; so do K-FAC/EK-FAC). The default follows
            bench/bench_estimators.py: against actual retraining on digits, Gauss-Newton CG had
            the best linear datamodeling score on both the MLP (0.68 vs 0.42 for Hessian CG and
            0.52 for the exact Hessian) and the CNN (0.52 vs 0.46), and the best or second-best
            deletion Spearman (−0.41 MLP, −0.63 CNN), at CG's cost and memory; rerun with the
            fixed K-FAC/EK-FAC, they score LDS 0.51/0.50 (MLP) and 0.36/0.38 (CNN). On deeper
            CNNs (bench/bench_deep.py, 52k–207k params) K-FAC/EK-FAC agree with retraining
            better and are 6–15× faster than GGN-CG: there use ``solver="ekfac"`` with `model=`.
        damping: δ >= 0, or "auto" = 1e-4 · tr(H)/P (Hutchinson estimate, 8 probes), i.e. a
            small fraction of the mean curvature eigenvalue.
        escalate_damping: if a solve meets negative curvature (CG, dense), diverges (LiSSA) or
            returns non-finite values (K-FAC with an empty direction), retry with damping ×10
            (up to 6 times); every escalation is reported in the result.
        rtol, atol, max_steps: CG stopping rule per class.
        method: "auto", "jvp" or "per_sample" for the P stage.
        chunk_size: training samples per chunk in the P stage.
        hvp_batch_size: samples per minibatch inside each HVP.
        throw: raise `NumericalError` if a solve does not converge (else report it).
        seed: for the "auto" damping's probes and LiSSA's minibatch draws.
        execution: "auto" (default), "compiled" or "stepped": whether the loops over chunks and
            CG iterations run inside one XLA program or from the host over jitted chunk
            programs; "auto" steps on CPU (`kernels.loops_on_host`), the same numbers either
            way (to float rounding). Reported in `InfluenceResult.details`.
        report_residual: for K-FAC / EK-FAC, also measure their solution's residual against the
            chosen curvature (one more curvature product for all K right-hand sides; about as
            long as the factor pass on a CNN). Off by default; either way `converged` is False
            for them, since they solve an approximation of the curvature, not the system itself.
    """

    solver: str = "cg"
    preconditioner: str = "none"
    curvature: str = "auto"
    damping: float | str = "auto"
    escalate_damping: bool = True
    rtol: float = 1e-6
    atol: float = 0.0
    max_steps: int = 1000
    method: str = "auto"
    chunk_size: int = 256
    hvp_batch_size: int = 1024
    throw: bool = False
    seed: int = 0
    execution: str = "auto"
    report_residual: bool = False

    def __post_init__(self):
        checks.check_choice(self.solver, "solver", ("cg", "dense", "lissa", "kfac", "ekfac"))
        checks.check_choice(self.preconditioner, "preconditioner", ("none", "kfac", "ekfac"))
        if self.preconditioner != "none" and self.solver != "cg":
            checks.fail("preconditioner", repr(self.preconditioner), "'none' unless solver='cg'",
                        "use solver='cg' with a preconditioner, or preconditioner='none'")
        checks.check_choice(self.curvature, "curvature", ("auto", "hessian", "gauss_newton"))
        if self.damping != "auto":
            checks.check_positive(self.damping, "damping", allow_zero=True)
        checks.check_positive(self.rtol, "rtol")
        checks.check_positive(self.atol, "atol", allow_zero=True)
        checks.check_positive(self.max_steps, "max_steps", integer=True)
        checks.check_choice(self.method, "method", ("auto", "jvp", "per_sample"))
        checks.check_positive(self.chunk_size, "chunk_size", integer=True)
        checks.check_positive(self.hvp_batch_size, "hvp_batch_size", integer=True)
        checks.check_choice(self.execution, "execution", ("auto", "compiled", "stepped"))

    @classmethod
    def exact(cls, **kw) -> "InfluenceConfig":
        """Dense Hessian solve, no damping (small models; the reference)."""
        return cls(solver="dense", damping=0.0, **kw)

    @classmethod
    def fast(cls, **kw) -> "InfluenceConfig":
        """Gauss-Newton CG with a loose tolerance (large models, exploratory use)."""
        return cls(curvature="gauss_newton", rtol=1e-4, max_steps=200, **kw)


@dataclasses.dataclass(frozen=True)
class InfluenceResult:
    """The influence matrix and how it was obtained.

    Attributes:
        P: (N, K) category-wise influence (P > 0 beneficial).
        method: "jvp", "per_sample" or "closed_form".
        solver, curvature: what computed the inverse-HVPs.
        damping: the damping finally used (after any escalation).
        escalations: damping values tried before, with the reason.
        steps, residual, converged, negative_curvature: per-class solve diagnostics.
        solutions: the K inverse-HVP solutions U (K, P), flat.
        details: method-specific diagnostics (e.g. LiSSA's scale and λ_max).
    """

    P: jax.Array
    method: str
    solver: str
    curvature: str
    damping: float
    escalations: tuple
    steps: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    negative_curvature: np.ndarray
    solutions: jax.Array | None = None
    details: dict = dataclasses.field(default_factory=dict)

    @property
    def regions(self) -> np.ndarray:
        return influence_regions(self.P)

    def summary(self) -> dict:
        reg = self.regions
        return {
            "n_train": int(self.P.shape[0]), "num_classes": int(self.P.shape[1]),
            "method": self.method, "solver": self.solver, "curvature": self.curvature,
            "damping": float(self.damping), "escalations": list(self.escalations),
            "cg_steps": np.asarray(self.steps).tolist(),
            "relative_residual": np.asarray(self.residual).tolist(),
            "converged": bool(np.all(self.converged)),
            "regions": {REGION_NAMES[r]: int((reg == r).sum()) for r in REGION_NAMES},
            **({"details": self.details} if self.details else {}),
        }


def influence_regions(P) -> np.ndarray:
    """+1 joint-positive (all P[i,k] > 0), −1 joint-negative (all < 0), 0 trade-off."""
    P = np.asarray(P)
    return np.where((P > 0).all(1), JOINT_POSITIVE, np.where((P < 0).all(1), JOINT_NEGATIVE, TRADE_OFF))


def choose_method(num_params: int, num_classes: int, chunk_size: int) -> str:
    """Forward mode unless K is large and a chunk of per-sample gradients is cheap to hold.

    Measured (bench/bench_influence.py, MLP with 66k–74k params, N = 5e4, 2 CPU cores): forward
    mode was 20× faster than per-sample gradients at K = 2, 7.5× at K = 10 and 3.4× at K = 32,
    and it holds chunk × K numbers instead of chunk × P. Its cost grows with K, so per-sample
    gradients are taken only for K > 64 when a chunk of them fits in 256 MB.
    """
    if num_classes > 64 and chunk_size * num_params * 4 <= 256 * 2**20:
        return "per_sample"
    return "jvp"


def _validate(x_train, y_train, x_val, y_val, num_classes):
    xt = checks.as_features(x_train, "x_train")
    yt = checks.as_labels(y_train, "y_train", num_classes=num_classes, n=xt.shape[0], x_name="x_train")
    xv = checks.as_features(x_val, "x_val")
    yv = checks.as_labels(y_val, "y_val", num_classes=num_classes, n=xv.shape[0], x_name="x_val")
    if xt.shape[1:] != xv.shape[1:]:
        checks.fail("x_val", f"sample shape {xv.shape[1:]}", f"the training sample shape {xt.shape[1:]}",
                     "featurise both sets the same way")
    checks.check_all_classes_present(yv, num_classes, "y_val")
    return xt, yt, xv, yv



def _solver(config: InfluenceConfig, be, curv, data, G, matvec, *, model, params, x_train,
            weight_decay, num_classes) -> tuple[Callable, dict]:
    """damping -> `linsolve.SolveResult` for ``config.solver`` (one signature for every
    estimator), and the estimator's diagnostics."""
    if config.solver in ("cg", "dense") and config.preconditioner == "none":
        return (lambda d: be.solve(config.solver, curv, data, G, d, config.rtol, config.atol,
                                   config.max_steps)), {}
    theta = data.theta
    if config.solver == "lissa":
        details: dict = {}

        def lissa(d):
            lam = linsolve.power_iteration(lambda v: matvec(v[None])[0] + d * v, theta.size,
                                           theta.dtype, seed=config.seed)
            details.update(lissa_scale=1.2 * lam, lambda_max=lam)
            res = be.lissa(curv, data, G, scale=1.2 * lam, damping=d, rtol=config.rtol,
                           max_steps=config.max_steps, seed=config.seed)
            return linsolve.with_residual(res, matvec, G, d)

        return lissa, details
    if model is None:
        checks.fail("model", "None", "the nnx model (K-FAC/EK-FAC read its Dense/Conv layers)",
                    "pass model= to category_influence")
    factors = kfac.compute_factors(model, params, x_train, batch_size=config.hvp_batch_size,
                                   num_classes=num_classes)
    if config.solver == "cg":  # preconditioned by the factors
        return (lambda d: be.solve("cg", curv, data, G, d, config.rtol, config.atol, config.max_steps,
                                   factors=factors, ekfac=config.preconditioner == "ekfac")), {}

    def solve(d):
        res = kfac.solve_kfac(factors, G, damping=weight_decay + d, ekfac=config.solver == "ekfac")
        return linsolve.with_residual(res, matvec, G, d) if config.report_residual else res

    return solve, {}


def _check_request(config, num_classes, weight_decay, mesh):
    if not isinstance(config, InfluenceConfig):
        checks.fail("config", type(config).__name__, "an InfluenceConfig", "pass InfluenceConfig(...)")
    checks.check_positive(num_classes, "num_classes", integer=True)
    checks.check_positive(weight_decay, "weight_decay", allow_zero=True)
    if mesh is not None and config.solver not in ("cg", "dense"):
        checks.fail("config.solver", config.solver, "'cg' or 'dense' when a mesh is given",
                    "use solver='cg' (sharded HVPs), or drop mesh= for LiSSA/K-FAC/EK-FAC")
    if mesh is not None and config.preconditioner != "none":
        checks.fail("config.preconditioner", config.preconditioner, "'none' when a mesh is given",
                    "drop mesh= to precondition CG with K-FAC/EK-FAC factors")


def category_influence(loss_fn: LossFn, params, x_train, y_train, x_val, y_val, *,
                       num_classes: int, weight_decay: float,
                       config: InfluenceConfig = InfluenceConfig(), apply=None,
                       model=None, mesh=None) -> InfluenceResult:
    """The N×K category-wise influence matrix P of a trained model (``docs/method.md``).

    P[i, k] = (1/N) · g_kᵀ (H + δI)⁻¹ ∇ℓ(z_i; θ), g_k = ∇ mean_{val, class k} ℓ; P > 0 is beneficial.
    For new weights w the first-order change of class k's validation loss is
    ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] (training objective (1/N) Σ w_i ℓ_i + (λ/2)‖θ‖²).

    Args:
        loss_fn: per-sample ``loss_fn(params, x, y)`` (x unbatched); see `models.per_sample_loss`.
        params: trained parameters (any pytree).
        x_train, y_train: the training set the model was trained on, (N, ...) and (N,).
        x_val, y_val: the validation set; every class must be present.
        num_classes: K.
        weight_decay: λ used in training (it is part of the Hessian).
        config: `InfluenceConfig`.
        apply: ``apply(params, x_batch) -> logits``; needed for Gauss-Newton.
        model: the flax nnx module whose params these are; needed for K-FAC / EK-FAC.
        mesh: a `jax.sharding.Mesh` from `distributed.make_mesh` to shard the samples over
            devices (class gradients, every HVP inside CG, the P stage); None = one device.
            In a multi-process job pass this process's samples; P holds their rows.

    Returns:
        `InfluenceResult` with P (N, K) and solver diagnostics.

    Example:
        >>> from pareto_jax import data, models, train, influence
        >>> s = data.stratified_split(data.load_digits(), seed=0)
        >>> apply, params = models.functional(models.make_model("linear", (64,), 10))
        >>> loss_fn = models.per_sample_loss(apply)
        >>> params = train.train(loss_fn, params, s.train.x, s.train.y).params
        >>> res = influence.category_influence(loss_fn, params, s.train.x, s.train.y,
        ...     s.val.x, s.val.y, num_classes=10, weight_decay=1e-3)
        >>> res.P.shape
        (1078, 10)
    """
    _check_request(config, num_classes, weight_decay, mesh)
    xt, yt, xv, yv = _validate(x_train, y_train, x_val, y_val, num_classes)
    config, curvature_note = _resolve_curvature(config, loss_fn, params, apply, xt, yt)
    flat = kernels.flatten(loss_fn, params)
    theta = flat.theta
    xt, xv = xt.astype(theta.dtype), xv.astype(theta.dtype)
    checks.check_finite_array(theta, "params", "influence: parameters")
    be = _backend(mesh, config.execution)
    G = be.class_gradients(flat.loss, theta, be.chunks(xv, yv, 512, theta.dtype), yv, num_classes)
    checks.check_finite_array(G, "class gradients", "influence: class gradients")
    curv = _curvature(loss_fn, params, config.curvature, apply)
    data = be.objective(theta, be.chunks(xt, yt, config.hvp_batch_size, theta.dtype), xt.shape[0],
                        weight_decay)
    matvec = be.matvec(curv, data)
    solve, details = _solver(config, be, curv, data, G, matvec, model=model, params=params,
                             x_train=xt, weight_decay=weight_decay, num_classes=num_classes)
    damping = linsolve.resolve_damping(config.damping, matvec, theta, config.seed)
    res, damping, escalations = linsolve.solve_escalating(solve, damping,
                                                          escalate=config.escalate_damping)
    checks.check_finite_array(res.value, "inverse-HVP solutions", "influence: curvature solve")
    if config.throw:
        linsolve.check_solve(res, rtol=config.rtol)
    method = choose_method(theta.size, num_classes, config.chunk_size) if config.method == "auto" else config.method
    P = jnp.asarray(be.influence_rows(flat.loss, method, theta, res.value,
                                      be.chunks(xt, yt, config.chunk_size, theta.dtype), xt.shape[0]))
    checks.check_finite_array(P, "P", "influence: influence matrix")
    return InfluenceResult(P, method, config.solver, config.curvature, damping, tuple(escalations),
                           np.asarray(res.steps), np.asarray(res.residual), np.asarray(res.converged),
                           np.asarray(res.negative_curvature), res.value,
                           {**details, **curvature_note, "execution": be.execution})


def linear_category_influence(params, x_train, y_train, x_val, y_val, *, num_classes: int,
                              weight_decay: float, damping: float = 0.0,
                              weights=None) -> InfluenceResult:
    """`category_influence` for a `LinearClassifier` head, by the closed form (validated).

    `weights`: the per-sample weights the model was trained with (see `linear_influence`).
    """
    xt, yt, xv, yv = _validate(x_train, y_train, x_val, y_val, num_classes)
    if weights is not None:
        weights = checks.as_weights(weights, xt.shape[0], "weights")
    W, b = params["head"]["kernel"], params["head"]["bias"]
    dt = jnp.asarray(W).dtype
    P, U = closed_form.linear_influence(xt.astype(dt), yt, xv.astype(dt), yv, W, b, weight_decay=weight_decay,
                            damping=damping, return_solutions=True, weights=weights)
    checks.check_finite_array(P, "P", "influence: influence matrix (closed form)")
    K = num_classes
    d = W.shape[0]
    # solutions in the flat ordering of ravel_pytree(params), so they compose with the generic path
    flat_U = jax.vmap(lambda u: ravel_pytree(
        {"head": {"bias": u[d], "kernel": u[:d]}})[0])(U)
    z = np.zeros(K)
    return InfluenceResult(P, "closed_form", "cholesky", "hessian", damping, (), z.astype(int),
                           z, np.ones(K, bool), np.zeros(K, bool), flat_U)


def predict_class_loss_change(result: InfluenceResult, weights, *, params=None,
                              weight_decay: float = 0.0, normalizer: str = "n") -> np.ndarray:
    """First-order change of each class's validation loss when retraining with `weights`.

    ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] for the fixed-N objective (1/N) Σ w_i ℓ_i + (λ/2)‖θ‖².
    With ``normalizer="weights"`` (Σ w ℓ / Σ w) the data term is rescaled against the
    regulariser, which acts as λ → λ·Σw/N; its first-order effect −λ(Σw/N − 1)·u_kᵀθ is added
    (needs `params` and `weight_decay`).
    """
    checks.check_choice(normalizer, "normalizer", ("n", "weights"))
    P = np.asarray(result.P, np.float64)
    w = checks.as_weights(weights, P.shape[0])
    delta = -(w - 1.0) @ P
    if normalizer == "weights" and weight_decay:
        if params is None or result.solutions is None:
            checks.fail("params", "None", "the trained params (and a result with solutions)",
                         "pass params= to account for the Σw normaliser")
        theta = np.asarray(ravel_pytree(params)[0], np.float64)
        delta = delta - weight_decay * (w.sum() / w.size - 1.0) * (np.asarray(result.solutions, np.float64) @ theta)
    return delta
