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
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import checks, closed_form, distributed, io, kernels, kfac, linsolve, models
from .backend import Local
from .kernels import Curvature

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]

JOINT_POSITIVE, TRADE_OFF, JOINT_NEGATIVE = 1, 0, -1
REGION_NAMES = {JOINT_POSITIVE: "joint-positive", TRADE_OFF: "trade-off", JOINT_NEGATIVE: "joint-negative"}


def _backend(mesh, execution: str = "auto", progress: bool = False):
    return Local(execution, progress) if mesh is None else distributed.Sharded(mesh)


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


def _curvature(loss_fn, params, curvature: str, apply, output_loss=None) -> Curvature:
    checks.check_choice(curvature, "curvature", ("hessian", "gauss_newton"))
    f = kernels.flatten(loss_fn, params).loss
    if curvature == "hessian":
        return Curvature(f, None, "hessian")
    if apply is None:
        checks.fail("apply", "None", "the model's apply(params, x_batch) -> logits",
                    "pass apply= for Gauss-Newton curvature, or write the loss as "
                    "models.OutputLoss(apply, output_loss)")
    return Curvature(f, kernels.flat_logits(apply, params), "gauss_newton", output_loss)


def cross_entropy_mismatch(loss_fn: LossFn, params, apply, x, y, n: int = 16) -> float:
    """Max relative difference, over the first n samples, between ``loss_fn`` and the softmax
    cross-entropy of ``apply``'s logits (0 when loss_fn is that cross-entropy)."""
    xs, ys = kernels.take(x, slice(0, n)), jnp.asarray(y[:n])
    ours = jax.vmap(loss_fn, (None, 0, 0))(params, xs, ys)
    ce = optax.softmax_cross_entropy_with_integer_labels(apply(params, xs), ys)
    return float(jnp.max(jnp.abs(ours - ce) / jnp.maximum(jnp.abs(ce), 1e-6)))


def _not_cross_entropy(loss_fn, params, apply, x, y) -> str | None:
    """Why Gauss-Newton with the closed-form output Hessian, or K-FAC, would be wrong for this
    loss (None when loss_fn is the softmax cross-entropy of apply's logits, checked on 16
    training samples): they use that loss's output Hessian diag p − ppᵀ whatever the loss."""
    gap = cross_entropy_mismatch(loss_fn, params, apply, x, y)
    if gap <= 1e-4:
        return None
    return (f"loss_fn is not the softmax cross-entropy of apply's logits (relative difference {gap:.2g} "
            f"on 16 training samples)")


def output_hessian_min_eig(output_loss, apply, params, x, y, n: int = 16) -> float:
    """The smallest eigenvalue of the output loss's Hessian (w.r.t. the logits) over the first n
    samples, relative to the largest magnitude: < 0 means Gauss-Newton is not PSD here."""
    xs, ys = kernels.take(x, slice(0, n)), jnp.asarray(y[:n])
    H = jax.vmap(jax.hessian(output_loss))(apply(params, xs), ys)
    ev = jnp.linalg.eigvalsh(H)
    return float(jnp.min(ev) / jnp.maximum(jnp.max(jnp.abs(ev)), 1e-30))


def _refuse(what: str, why: str, fix: str | None = None):
    checks.fail("config", what, "a loss that is softmax cross-entropy of apply's logits for K-FAC / EK-FAC "
                "and for Gauss-Newton with a plain loss_fn",
                fix or f"{why}; write the loss as models.OutputLoss(apply, output_loss) for an exact "
                "Gauss-Newton, or use curvature='hessian' with solver 'cg', 'dense' or 'lissa'")


def _resolve_curvature(config: "InfluenceConfig", loss_fn, params, apply, x, y):
    """(config with its curvature decided, apply, the output loss for Gauss-Newton (None =
    closed-form cross-entropy), a details note).

    * A loss written as `models.OutputLoss` carries its own output loss, so Gauss-Newton uses
      that loss's Hessian w.r.t. the logits (autodiff; exact for any output loss). "auto" takes
      it when that Hessian is PSD on 16 training samples, else the full Hessian (noted).
    * A plain ``loss_fn`` with ``apply``: Gauss-Newton only when loss_fn is the softmax
      cross-entropy of apply's logits (`_not_cross_entropy`); "auto" takes the Hessian
      otherwise (noted), an explicit Gauss-Newton request is refused.
    * K-FAC / EK-FAC factor the Gauss-Newton matrix with the output loss's Hessian: an
      `OutputLoss` gives its own; a plain loss_fn must be the cross-entropy (else refused).

    Never answers with a curvature that is not the one the loss defines.
    """
    split = isinstance(loss_fn, models.OutputLoss)
    if split and apply is None:
        apply = loss_fn.apply
    kfac_like = config.solver in ("kfac", "ekfac") or config.preconditioner != "none"
    note: dict = {}
    if kfac_like and not split:  # an OutputLoss gives the factors its own output Hessian
        why = "apply is None" if apply is None else _not_cross_entropy(loss_fn, params, apply, x, y)
        if why is not None:
            _refuse(f"solver={config.solver!r}, preconditioner={config.preconditioner!r}", why,
                    f"{why}; K-FAC / EK-FAC need the loss's output Hessian: write the loss as "
                    "models.OutputLoss(apply, output_loss), or use solver='cg' with the Hessian")
    if config.curvature == "hessian" or apply is None:
        return dataclasses.replace(config, curvature="hessian") if config.curvature == "auto" else config, \
            apply, None, note
    if split:
        out = None if loss_fn.is_cross_entropy else loss_fn.output_loss
        if config.curvature == "auto" and out is not None and not kfac_like:
            lo = output_hessian_min_eig(out, apply, params, x, y)
            if lo < -1e-6:
                return dataclasses.replace(config, curvature="hessian"), apply, None, {
                    "curvature_note": f"the output loss's Hessian is indefinite (relative min eigenvalue "
                                      f"{lo:.2g} on 16 training samples): the Hessian is used, not Gauss-Newton"}
        return dataclasses.replace(config, curvature="gauss_newton"), apply, out, note
    why = _not_cross_entropy(loss_fn, params, apply, x, y)
    if why is None:
        return dataclasses.replace(config, curvature="gauss_newton"), apply, None, note
    if config.curvature == "auto" and not kfac_like:
        return dataclasses.replace(config, curvature="hessian"), apply, None, {
            "curvature_note": f"{why}: the Hessian is used, since Gauss-Newton needs the loss's output "
                              "Hessian (write the loss as models.OutputLoss(apply, output_loss) to get it)"}
    _refuse(f"curvature={config.curvature!r}, solver={config.solver!r}", why)


def check_loss(loss_fn, params, x, y, name: str = "loss_fn") -> None:
    """The loss must map one sample (no batch axis) to a finite scalar (abstract evaluation
    first, so a batched loss is named before any compilation)."""
    if not callable(loss_fn):
        checks.fail(name, type(loss_fn).__name__, "a function (params, x, y) -> scalar",
                    "pass e.g. models.per_sample_loss(apply)")
    x0, y0 = kernels.take(x, 0), jnp.asarray(y[0])
    try:
        out = jax.eval_shape(loss_fn, params, x0, y0)
    except Exception as e:  # the user's function failed on one sample
        checks.fail(name, f"a function that raised {type(e).__name__}: {str(e)[:200]} on one sample",
                    "a per-sample function (params, x, y) -> scalar, x without a batch axis",
                    "write the loss for one sample; the library vmaps it (models.per_sample_loss "
                    "turns an apply(params, x_batch) into one)")
    if getattr(out, "shape", None) != ():
        checks.fail(name, f"an output of shape {getattr(out, 'shape', type(out).__name__)} for one sample",
                    "a scalar per sample", "return the loss of the one sample given (do not average a "
                    "batch, do not keep a batch axis); the library vmaps it over samples")


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
    checks.check_choice(curvature, "curvature", ("hessian", "gauss_newton"))
    config, apply, out, _ = _resolve_curvature(InfluenceConfig(curvature=curvature), loss_fn, params,
                                               apply, x_train, y_train)
    curv = _curvature(loss_fn, params, config.curvature, apply, out)
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
            `apply` and a cross-entropy loss, or a `models.OutputLoss`, whose own output Hessian it
            uses; so do K-FAC/EK-FAC). The default follows
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


_RESULT_ARRAYS = ("P", "steps", "residual", "converged", "negative_curvature", "solutions", "sample_ids")
_RESULT_META = ("method", "solver", "curvature", "damping", "escalations", "details", "names")


@dataclasses.dataclass(frozen=True)
class InfluenceResult:
    """The influence matrix and how it was obtained (a pytree: its arrays are the leaves).

    Attributes:
        P: (N, K) category-wise influence (P > 0 beneficial); K classes, or groups when the
            validation set was partitioned by `groups=`.
        method: "jvp", "per_sample" or "closed_form".
        solver, curvature: what computed the inverse-HVPs.
        damping: the damping finally used (after any escalation).
        escalations: damping values tried before, with the reason.
        steps, residual, converged, negative_curvature: per-class solve diagnostics.
        solutions: the K inverse-HVP solutions U (K, P), flat.
        details: method-specific diagnostics (e.g. LiSSA's scale and λ_max).
        names: the K column names (class or group names), or None.
        sample_ids: (N,) ids of the training samples (the rows), or None.

    `save(path)` writes one ``.npz`` with plain keys (``P``, ``solutions``, ``names``,
    ``sample_ids``, the diagnostics, and ``meta`` as JSON); `InfluenceResult.load(path)` reads it
    back.
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
    names: tuple | None = None
    sample_ids: np.ndarray | None = None

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
            **({"names": list(self.names)} if self.names is not None else {}),
            **({"details": self.details} if self.details else {}),
        }

    def save(self, path) -> str:
        """Write the result to ``path`` (``.npz``, atomically; see the class docstring). Returns
        the path."""
        import json

        path = str(path)
        arrays = {k: getattr(self, k) for k in _RESULT_ARRAYS if getattr(self, k) is not None}
        if self.names is not None:
            arrays["names"] = [str(n) for n in self.names]
        meta = {"method": self.method, "solver": self.solver, "curvature": self.curvature,
                "damping": float(self.damping), "escalations": self.escalations, "details": self.details}
        arrays["meta"] = json.dumps(io.to_jsonable(meta), default=str)
        io.save_arrays(path, arrays)
        return path

    @classmethod
    def load(cls, path) -> "InfluenceResult":
        """Read a result written by `save` (P and solutions come back as device arrays)."""
        import json

        z = io.load_arrays(path)
        if "P" not in z or "meta" not in z:
            checks.fail("path", f"{path} with keys {sorted(z)}", "a file written by InfluenceResult.save",
                        "save the result with result.save(path)")
        meta = json.loads(str(z["meta"]))
        names = tuple(str(n) for n in z["names"]) if "names" in z else None
        sol = z.get("solutions")
        return cls(jnp.asarray(z["P"]), meta["method"], meta["solver"], meta["curvature"],
                   float(meta["damping"]), tuple(meta["escalations"]), z.get("steps"), z.get("residual"),
                   z.get("converged"), z.get("negative_curvature"),
                   None if sol is None else jnp.asarray(sol), meta["details"], names, z.get("sample_ids"))


class _Static:
    """A JSON-like value (dict, list) as pytree metadata: hashed and compared by its JSON text,
    so a result can be passed into a jitted function (its treedef is part of the cache key)."""

    def __init__(self, value):
        import json

        self.value = value
        self._key = json.dumps(io.to_jsonable(value), sort_keys=True, default=str)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Static) and self._key == other._key


def _flatten_result(r):
    meta = tuple(_Static(getattr(r, k)) if k in ("escalations", "details") else getattr(r, k) for k in _RESULT_META)
    return tuple(getattr(r, k) for k in _RESULT_ARRAYS), meta


def _unflatten_result(meta, arrays):
    meta = [m.value if isinstance(m, _Static) else m for m in meta]
    return InfluenceResult(**dict(zip(_RESULT_ARRAYS, arrays)), **dict(zip(_RESULT_META, meta)))


jax.tree_util.register_pytree_node(InfluenceResult, _flatten_result, _unflatten_result)


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


def _validate_train(x_train, y_train, num_classes):
    xt = checks.as_inputs(x_train, "x_train")
    yt = checks.as_labels(y_train, "y_train", num_classes=num_classes, n=checks.num_inputs(xt), x_name="x_train")
    return xt, yt


def _is_source(x) -> bool:
    return callable(x) and not hasattr(x, "shape") and not isinstance(x, (dict, list, tuple))


def _validate_source(batches, y_train, num_classes):
    """One pass over a batch source: every batch validated on the host (inputs, labels, the
    same structure and sample shape throughout); returns (`kernels.Source`, the first batch)."""
    if y_train is not None:
        checks.fail("y_train", "labels beside a batch source", "None (the labels come with each batch)",
                    "yield (x_batch, y_batch) from x_train() and pass y_train=None")
    n, first = 0, None
    for i, item in enumerate(batches()):
        if not (isinstance(item, tuple) and len(item) == 2):
            checks.fail("x_train", f"a batch source whose batch {i} is a {type(item).__name__}",
                        "(x_batch, y_batch) pairs", "make x_train() yield (inputs, labels) tuples")
        xb = checks.as_inputs(item[0], f"x_train batch {i}")
        yb = checks.as_labels(item[1], f"y_train batch {i}", num_classes=num_classes, n=checks.num_inputs(xb),
                              x_name=f"x_train batch {i}")
        if first is None:
            first = (xb, yb)
        else:
            _same_kind(first[0], xb, f"x_train batch {i}", "the first batch's")
        n += yb.shape[0]
    if first is None:
        checks.fail("x_train", "a batch source that yielded nothing", "at least one (x_batch, y_batch)",
                    "check that x_train() returns a fresh iterator on every call")
    return kernels.Source(batches, n), first


def _same_kind(ref, x, name, what):
    sr, sx = jax.tree_util.tree_structure(ref), jax.tree_util.tree_structure(x)
    if sr != sx:
        checks.fail(name, f"inputs structured as {sx}", f"{what} structure {sr}",
                    "pass inputs of the same kind everywhere")
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(x)):
        if a.shape[1:] != b.shape[1:]:
            checks.fail(name, f"sample shape {b.shape[1:]}", f"{what} sample shape {a.shape[1:]}",
                        "featurise every set the same way")


def _validate_val(xt, x_val, y_val, num_classes):
    xv = checks.as_inputs(x_val, "x_val")
    yv = checks.as_labels(y_val, "y_val", num_classes=num_classes, n=checks.num_inputs(xv), x_name="x_val")
    _same_kind(xt, xv, "x_val", "the training inputs'")
    return xv, yv


def _validate(x_train, y_train, x_val, y_val, num_classes):
    xt, yt = _validate_train(x_train, y_train, num_classes)
    xv, yv = _validate_val(xt, x_val, y_val, num_classes)
    checks.check_all_classes_present(yv, num_classes, "y_val")
    return xt, yt, xv, yv


def _groups(groups, yv, num_classes, group_names, class_names):
    """(group id per validation sample, number of groups, column names)."""
    if groups is None:
        checks.check_all_classes_present(yv, num_classes, "y_val")
        return yv, num_classes, class_names
    g = checks.as_labels(groups, "groups", n=yv.shape[0], x_name="x_val")
    G = int(g.max()) + 1 if group_names is None else len(group_names)
    if g.max() >= G:
        checks.fail("groups", f"group id {int(g.max())} with {G} group_names", f"ids in [0, {G})",
                    "give one name per group")
    counts = np.bincount(g, minlength=G)
    if (counts == 0).any():
        checks.fail("groups", f"no validation samples in group(s) {np.flatnonzero(counts == 0).tolist()}",
                    "at least one validation sample in every group 0..G-1",
                    "renumber the groups to 0..G-1 without gaps, or drop the empty group's name")
    return g, G, tuple(group_names) if group_names is not None else None


@functools.partial(jax.jit, static_argnums=0)
def _measure_chunk(measure, params, xb, yb):
    return jax.vmap(measure, (None, 0, 0))(params, xb, yb)


def _check_finite_measure(measure, params, xv, yv):
    """A user measurement must be finite on every validation sample (its mean is what P is the
    influence on; a NaN there has a finite gradient and would pass unseen)."""
    for xb, yb, mb in kernels.iter_chunks(kernels.pad_chunks(xv, yv, 512)):
        vals = np.asarray(_measure_chunk(measure, params, xb, yb))[np.asarray(mb) > 0]
        if not np.all(np.isfinite(vals)):
            checks.fail("measure_fn", f"{int((~np.isfinite(vals)).sum())} non-finite value(s) on the validation set",
                        "a finite measurement on every validation sample",
                        "guard logs and divisions in measure_fn (e.g. clip probabilities)")


@functools.lru_cache(maxsize=64)
def _on_pairs(measure):
    """measure(params, x, y) as a function of ((x, y), group): validation chunks carry the
    group id where the kernels expect the label, so any partition reuses the class kernels."""

    def f(params, xy, g):
        del g
        return measure(params, xy[0], xy[1])

    return f


def _solver(config: InfluenceConfig, be, curv, data, matvec, *, model, params, x_train,
            weight_decay, num_classes, factors=None, y_train=None, output_loss=None) -> tuple[Callable, dict]:
    """(G, damping) -> `linsolve.SolveResult` for ``config.solver`` (one signature for every
    estimator; the factors, if any, computed once here), and the estimator's diagnostics."""
    if config.solver in ("cg", "dense") and config.preconditioner == "none":
        return (lambda G, d: be.solve(config.solver, curv, data, G, d, config.rtol, config.atol,
                                      config.max_steps)), {}
    theta = data.theta
    if config.solver == "lissa":
        details: dict = {}

        def lissa(G, d):
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
    if not isinstance(x_train, np.ndarray):
        checks.fail("x_train", "a pytree of input arrays", "one input array for K-FAC / EK-FAC",
                    "use solver='cg' for models with structured inputs")
    if factors is None:
        factors = kfac.compute_factors(model, params, x_train, batch_size=config.hvp_batch_size,
                                       num_classes=num_classes, y=y_train, output_loss=output_loss)
    details = {"factors": factors}  # kept by Influence for save(); not a diagnostic
    if config.solver == "cg":  # preconditioned by the factors
        return (lambda G, d: be.solve("cg", curv, data, G, d, config.rtol, config.atol, config.max_steps,
                                      factors=factors, ekfac=config.preconditioner == "ekfac")), details

    def solve(G, d):
        res = kfac.solve_kfac(factors, G, damping=weight_decay + d, ekfac=config.solver == "ekfac")
        return linsolve.with_residual(res, matvec, G, d) if config.report_residual else res

    return solve, details


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


class Influence:
    """The training side of influence, fitted once; `influence` then answers for any
    validation set, any grouping of it and any measurement.

    Fitting validates the training set, decides the curvature (`InfluenceConfig.curvature`),
    places the training chunks, resolves the damping and, for K-FAC / EK-FAC, computes the
    factors. Each `influence` call costs one pass over its validation set, K solves and one
    pass over the training set for P's rows.

    Args:
        loss_fn: per-sample ``loss_fn(params, x, y)`` (x unbatched; any pytree of arrays). A
            `models.OutputLoss` (``output_loss(apply(params, x), y)``) gives an exact
            Gauss-Newton for any output loss.
        params: trained parameters (any pytree).
        x_train, y_train: the training set the model was trained on: inputs (N, ...) (an array,
            or a pytree of arrays with a shared leading axis; integer token IDs stay integers)
            and integer labels (N,). Or, to stream a training set that does not fit in memory:
            ``x_train`` a function returning a fresh iterator of (x_batch, y_batch) on every
            call, and ``y_train=None``; each pass puts one chunk on the device at a time and P's
            rows are written to the host as they are computed (CG on one device).
        num_classes, weight_decay, config, apply, model, mesh: as for `category_influence`.
        class_names: names of the K classes (carried into results).
        sample_ids: (N,) ids of the training samples (carried into results; default 0..N-1).

    Example:
        >>> fit = Influence(loss_fn, params, x_train, y_train, num_classes=10, weight_decay=1e-3)
        >>> by_class = fit.influence(x_val, y_val)
        >>> by_domain = fit.influence(x_val, y_val, groups=domain_ids, group_names=("a", "b"))
    """

    def __init__(self, loss_fn: LossFn, params, x_train, y_train, *, num_classes: int,
                 weight_decay: float, config: InfluenceConfig = InfluenceConfig(), apply=None,
                 model=None, mesh=None, class_names=None, sample_ids=None, progress: bool = False,
                 _saved=None):
        _check_request(config, num_classes, weight_decay, mesh)
        if _is_source(x_train):
            xt, (x_ex, y_ex) = _validate_source(x_train, y_train, num_classes)
            yt, n = None, xt.n
            if config.solver != "cg" or config.preconditioner != "none" or mesh is not None:
                checks.fail("config", f"solver={config.solver!r}, preconditioner={config.preconditioner!r}, "
                            f"mesh={'set' if mesh is not None else None}", "solver='cg' on one device for a batch source",
                            "use InfluenceConfig(solver='cg') without a mesh, or pass arrays")
        else:
            xt, yt = _validate_train(x_train, y_train, num_classes)
            x_ex, y_ex, n = xt, yt, checks.num_inputs(xt)
        check_loss(loss_fn, params, x_ex, y_ex)
        if class_names is not None and len(class_names) != num_classes:
            checks.fail("class_names", f"{len(class_names)} names", f"{num_classes}, one per class",
                        "pass one name per class, in label order")
        if sample_ids is not None and np.shape(sample_ids) != (n,):
            checks.fail("sample_ids", f"shape {np.shape(sample_ids)}", f"shape ({n},), one id per training sample",
                        "pass one id per row of x_train")
        config, apply, out, note = _resolve_curvature(config, loss_fn, params, apply, x_ex, y_ex)
        flat = kernels.flatten(loss_fn, params)
        theta = flat.theta
        checks.check_finite_array(theta, "params", "influence: parameters")
        be = _backend(mesh, config.execution, progress)
        self.loss_fn, self.params, self.config, self.apply = loss_fn, params, config, apply
        self.num_classes, self.weight_decay, self.mesh = int(num_classes), float(weight_decay), mesh
        self.class_names = None if class_names is None else tuple(str(c) for c in class_names)
        self.sample_ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
        self._x, self._y, self._n, self._flat, self._be, self._example = xt, yt, n, flat, be, x_ex
        self.curvature = _curvature(loss_fn, params, config.curvature, apply, out)
        self._data = be.objective(theta, be.chunks(xt, yt, config.hvp_batch_size, theta.dtype), n, weight_decay)
        self._matvec = be.matvec(self.curvature, self._data)
        saved = _saved or {}
        self._solve, self._details = _solver(config, be, self.curvature, self._data, self._matvec, model=model,
                                             params=params, x_train=xt, weight_decay=weight_decay,
                                             num_classes=num_classes, factors=saved.get("factors"), y_train=yt,
                                             output_loss=None if not isinstance(loss_fn, models.OutputLoss)
                                             or loss_fn.is_cross_entropy else loss_fn.output_loss)
        self.factors = self._details.pop("factors", None)
        self.damping = saved["damping"] if "damping" in saved else \
            linsolve.resolve_damping(config.damping, self._matvec, theta, config.seed)
        self._details = {**self._details, **note,
                         "execution": be.execution if yt is not None else "stepped (streamed from a batch source)"}

    def _fingerprint(self) -> str:
        return io.fingerprint(self._flat.theta, self._n)  # the params' bytes and N

    def save(self, folder):
        """Write the fitted state to `folder`: ``state.json`` (the resolved config, damping,
        curvature, sizes, class names and a fingerprint of the params and N), ``sample_ids.npy``
        and, for K-FAC / EK-FAC, ``factors.npz``. Returns the folder."""
        from pathlib import Path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        io.write_json(folder / "state.json", {
            "config": dataclasses.asdict(self.config), "damping": self.damping, "num_classes": self.num_classes,
            "weight_decay": self.weight_decay, "class_names": self.class_names,
            "fingerprint": self._fingerprint()})
        np.save(folder / "sample_ids.npy", self.sample_ids)
        if self.factors is not None:
            kfac.save_factors(folder / "factors.npz", self.factors)
        return folder

    @classmethod
    def load(cls, folder, loss_fn: LossFn, params, x_train, y_train, *, apply=None, model=None,
             mesh=None) -> "Influence":
        """The `Influence` saved in `folder`, for the same model, params and training set (checked
        by fingerprint): the damping and any K-FAC / EK-FAC factors are read, not recomputed."""
        from pathlib import Path

        folder = Path(folder)
        st = io.read_json(folder / "state.json")
        saved = {"damping": float(st["damping"])}
        if (folder / "factors.npz").exists():
            saved["factors"] = kfac.load_factors(folder / "factors.npz")
        fit = cls(loss_fn, params, x_train, y_train, num_classes=st["num_classes"], weight_decay=st["weight_decay"],
                  config=InfluenceConfig(**st["config"]), apply=apply, model=model, mesh=mesh,
                  class_names=st["class_names"], sample_ids=np.load(folder / "sample_ids.npy"), _saved=saved)
        if fit._fingerprint() != st["fingerprint"]:
            checks.fail("params", f"parameters / a training set with fingerprint {fit._fingerprint()}",
                        f"the ones saved in {folder} (fingerprint {st['fingerprint']} of the params and N)",
                        "load with the params and training set the state was fitted on, or fit again")
        return fit

    def influence(self, x_val, y_val, *, groups=None, group_names=None, measure_fn=None) -> InfluenceResult:
        """P (N, K) for this validation set: column k is the influence of every training sample
        on the mean measurement of validation group k (by default: class k's mean loss).

        Args:
            x_val, y_val: validation inputs (same structure as the training inputs) and labels.
            groups: (n_val,) integer group ids 0..G-1 partitioning the validation set (a domain,
                a demographic group, ...); default: the classes (every class must be present).
            group_names: the G group names (default: the class names for classes).
            measure_fn: per-sample ``measure_fn(params, x, y)`` to lower, averaged per group
                (default: the training loss_fn); e.g. a margin loss or a calibration term.
                P > 0 still means "up-weighting the sample lowers the group's measurement".
        """
        config, be, flat = self.config, self._be, self._flat
        theta = flat.theta
        xv, yv = _validate_val(self._example, x_val, y_val, self.num_classes)
        g, K, names = _groups(groups, yv, self.num_classes, group_names, self.class_names)
        measure = self.loss_fn if measure_fn is None else measure_fn
        if measure_fn is not None:
            check_loss(measure_fn, self.params, xv, yv, "measure_fn")
            _check_finite_measure(measure_fn, self.params, xv, yv)
        fv = kernels.flatten(_on_pairs(measure), self.params).loss
        G = be.class_gradients(fv, theta, be.chunks((xv, yv), g, 512, theta.dtype), g, K)
        if measure_fn is not None and not np.all(np.isfinite(np.asarray(G))):
            checks.fail("measure_fn", "non-finite gradients of the mean measurement of some group",
                        "a measurement with finite values and gradients on the validation set",
                        "guard logs and divisions in measure_fn (e.g. clip probabilities)")
        checks.check_finite_array(G, "class gradients", "influence: class gradients")
        res, damping, escalations = linsolve.solve_escalating(lambda d: self._solve(G, d), self.damping,
                                                              escalate=config.escalate_damping)
        checks.check_finite_array(res.value, "inverse-HVP solutions", "influence: curvature solve")
        if config.throw:
            linsolve.check_solve(res, rtol=config.rtol)
        method = choose_method(theta.size, K, config.chunk_size) if config.method == "auto" else config.method
        P = jnp.asarray(be.influence_rows(flat.loss, method, theta, res.value,
                                          be.chunks(self._x, self._y, config.chunk_size, theta.dtype), self._n))
        checks.check_finite_array(P, "P", "influence: influence matrix")
        return InfluenceResult(P, method, config.solver, config.curvature, damping, tuple(escalations),
                               np.asarray(res.steps), np.asarray(res.residual), np.asarray(res.converged),
                               np.asarray(res.negative_curvature), res.value, dict(self._details), names,
                               self.sample_ids)


def category_influence(loss_fn: LossFn, params, x_train, y_train, x_val, y_val, *,
                       num_classes: int, weight_decay: float,
                       config: InfluenceConfig = InfluenceConfig(), apply=None,
                       model=None, mesh=None, groups=None, group_names=None, measure_fn=None,
                       class_names=None, sample_ids=None, progress: bool = False) -> InfluenceResult:
    """The N×K category-wise influence matrix P of a trained model (``docs/method.md``).

    P[i, k] = (1/N) · g_kᵀ (H + δI)⁻¹ ∇ℓ(z_i; θ), g_k = ∇ mean_{val, class k} ℓ; P > 0 is beneficial.
    For new weights w the first-order change of class k's validation loss is
    ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] (training objective (1/N) Σ w_i ℓ_i + (λ/2)‖θ‖²).
    One call of `Influence` (fit) and `Influence.influence` (query); keep the `Influence` to
    ask again for other validation sets, groupings or measurements without refitting.

    Args:
        loss_fn: per-sample ``loss_fn(params, x, y)`` (x unbatched); see `models.per_sample_loss`
            and `models.OutputLoss`.
        params: trained parameters (any pytree).
        x_train, y_train: the training set the model was trained on, (N, ...) and (N,); inputs
            may be a pytree of arrays with a shared leading axis (integer token IDs stay integers).
        x_val, y_val: the validation set; every class must be present (unless `groups` is given).
        num_classes: K.
        weight_decay: λ used in training (it is part of the Hessian).
        config: `InfluenceConfig`.
        apply: ``apply(params, x_batch) -> logits``; needed for Gauss-Newton with a plain
            loss_fn (an `OutputLoss` carries its own).
        model: the flax nnx module whose params these are; needed for K-FAC / EK-FAC.
        mesh: a `jax.sharding.Mesh` from `distributed.make_mesh` to shard the samples over
            devices (class gradients, every HVP inside CG, the P stage); None = one device.
            In a multi-process job pass this process's samples; P holds their rows.
        groups, group_names, measure_fn: see `Influence.influence`.
        class_names, sample_ids: carried into the result (see `Influence`).
        progress: a progress bar over the CG iterations (host-stepped solves, the CPU default).

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
    _check_request(config, num_classes, weight_decay, mesh)  # every input checked before any work
    checks.check_not_traced((params, x_train if not _is_source(x_train) else None, x_val), "params",
                            "influence.influence_matrix (pure JAX: jit, vmap and grad work)")
    xt, yt = (x_train, y_train) if _is_source(x_train) else _validate_train(x_train, y_train, num_classes)
    if not _is_source(xt):
        xv, yv = _validate_val(xt, x_val, y_val, num_classes)
        _groups(groups, yv, num_classes, group_names, class_names)
    else:
        xv, yv = x_val, y_val
    fit = Influence(loss_fn, params, xt, yt, num_classes=num_classes, weight_decay=weight_decay,
                    config=config, apply=apply, model=model, mesh=mesh, class_names=class_names,
                    sample_ids=sample_ids, progress=progress)
    return fit.influence(xv, yv, groups=groups, group_names=group_names, measure_fn=measure_fn)


def influence_matrix(loss_fn: LossFn, params, x_train, y_train, x_val, y_val, *, num_classes: int,
                     weight_decay, damping, curvature: str = "hessian", rtol=1e-6, max_steps: int = 1000,
                     chunk_size: int = 256, hvp_batch_size: int = 1024):
    """The jittable core: P (N, K) and the CG diagnostics (`linsolve.SolveResult`), in pure JAX.

    The same numbers as `category_influence` with ``solver="cg"``, but no validation, no host
    loops and no algorithm choice, so it composes with `jax.jit`, `jax.vmap` (e.g. over a stack
    of checkpoints' params, to average influence over training) and `jax.grad`. Validate inputs
    with `category_influence` once; use this inside your own transforms.

    Args:
        loss_fn: per-sample loss; a `models.OutputLoss` for ``curvature="gauss_newton"`` (its own
            output Hessian is used).
        params, x_train, y_train, x_val, y_val: as for `category_influence` (arrays or pytrees;
            every class must be present in y_val: an absent class gives a zero column).
        num_classes, max_steps, chunk_size, hvp_batch_size: static (Python ints).
        weight_decay, damping, rtol: numbers or scalar arrays (may be traced).
        curvature: "hessian" or "gauss_newton" (static).
    """
    flat = kernels.flatten(loss_fn, params)
    theta, dt, K = flat.theta, flat.theta.dtype, int(num_classes)
    if curvature == "gauss_newton":
        if not isinstance(loss_fn, models.OutputLoss):
            raise checks.InputError("argument `loss_fn`: got a plain function; expected a models.OutputLoss for "
                                    "curvature='gauss_newton'. Fix: pass models.OutputLoss(apply, output_loss)")
        out = None if loss_fn.is_cross_entropy else loss_fn.output_loss
        curv = Curvature(flat.loss, kernels.flat_logits(loss_fn.apply, params), "gauss_newton", out)
    else:
        curv = Curvature(flat.loss, None, "hessian")
    n = kernels.num_samples(x_train)

    def chunks(x, y, size):
        c = kernels.pad_chunks(x, y, size, xp=jnp)
        return kernels.Chunks(kernels.cast_floats(c.x, dt), c.y, c.mask.astype(dt))

    counts = jnp.maximum(jnp.bincount(jnp.asarray(y_val), length=K), 1).astype(dt)
    G = kernels.class_gradients(flat.loss, theta, chunks(x_val, y_val, 512), counts, K)
    data = kernels.ObjectiveData(theta, chunks(x_train, y_train, hvp_batch_size), jnp.asarray(n, dt),
                                 jnp.asarray(weight_decay, dt))
    matvec, d = kernels.curvature_matvec(curv, data), jnp.asarray(damping, dt)

    def op(v):
        return matvec(v) + d * v

    def cg(op_, b):  # CG for one right-hand side; its diagnostics as the auxiliary output
        r = linsolve.solve_cg(op_, b, rtol=jnp.asarray(rtol, dt), atol=jnp.asarray(0.0, dt), max_steps=int(max_steps))
        return r.value, r

    # custom_linear_solve: reverse-mode derivatives by implicit differentiation (one more solve
    # with the same symmetric operator), where a while_loop alone has none
    U, res = jax.vmap(lambda g: jax.lax.custom_linear_solve(op, g, cg, symmetric=True, has_aux=True))(G)
    rows = kernels.influence_rows(flat.loss, "jvp", theta, U, chunks(x_train, y_train, chunk_size))
    return rows.reshape(-1, K)[:n] / n, res


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
