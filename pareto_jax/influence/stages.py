"""The influence stages on their own, the jittable core, the closed form and the prediction.

* `class_gradients`, `make_hvp`, `influence_from_solutions`, `per_sample_gradients`: the stages
  (validated less than the front door; for tests, benchmarks and custom pipelines);
* `influence_matrix`: the jittable core, built from the same curvature (`curvature.build`) and
  CG (`linsolve.solve_cg`) as the front door;
* `linear_category_influence`: P of a linear head by the closed form (the oracle);
* `predict_class_loss_change`: the first-order effect of a weighting on each class.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .. import checks, closed_form, kernels, linsolve, models, train
from ..backend import Local
from ..config import NO_DAMPING, InfluenceConfig
from ..sharded import Sharded
from . import curvature, validation
from .result import InfluenceResult


def backend_for(mesh, execution: str = "auto", progress: bool = False):
    """The backend that runs the stages: one device (`backend.Local`), or the mesh's devices
    (`sharded.Sharded`)."""
    return Local(execution, progress) if mesh is None else Sharded(mesh)


def choose_method(num_params: int, num_classes: int, chunk_size: int, reuse: float = 1.0,
    itemsize: int = 4) -> str:
    """Forward mode unless K × `reuse` is large and a chunk of per-sample gradients fits.

    `reuse` is the forward pass's multiply-adds per sample per parameter
    (`kernels.param_reuse`): about 1 for a dense network, the positions a kernel slides over for
    a convolution, the tokens for a sequence model; `itemsize` the bytes per number. Forward
    mode costs K tangent passes, each about a forward pass (so ∝ K × reuse × P per sample);
    per-sample gradients cost one backward pass and a chunk × P × K product. Measured (2 CPU cores):
    on an MLP (66k–74k params, reuse ≈ 1, N = 5e4, bench/bench_influence.py) forward mode was
    20× faster at K = 2, 7.5× at K = 10 and 3.4× at K = 32; at K = 10 per-sample gradients were
    1.6× faster on a ResNet with BatchNorm, 1.9× on a three-block convnet and 3.4× on a small
    transformer (N = 3,000). So per-sample gradients are taken when K × reuse > 64 and a chunk
    of them fits in `kernels.PER_SAMPLE_BYTES`.
    """
    if num_classes * reuse > 64 and kernels.per_sample_fits(chunk_size, num_params, itemsize):
        return "per_sample"
    return "jvp"


@functools.lru_cache(maxsize=64)
def on_pairs(measure):
    """measure(params, x, y) as a function of ((x, y), group): validation chunks carry the
    group id where the kernels expect the label, so any partition reuses the class kernels."""

    def f(params, xy, g):
        del g
        return measure(params, xy[0], xy[1])

    return f


def class_gradients(
    loss_fn, params, x_val, y_val, num_classes: int, *, chunk_size: int = 512, mesh=None
) -> jax.Array:
    """g_k = ∇_θ mean_{i: y_i = k} ℓ(z_i; θ) for every class k, as a (K, P) matrix (flat θ).

    One pass over the validation set (`kernels.class_gradients`). Every class must be present
    (validated by `category_influence`; here an absent class gives a zero row). With `mesh`,
    the validation set is sharded over its devices and the result replicated.
    """
    flat = kernels.flatten(loss_fn, params)
    be = backend_for(mesh)
    chunks = be.chunks(x_val, y_val, chunk_size, flat.theta.dtype)
    return be.class_gradients(flat.loss, flat.theta, chunks, y_val, num_classes)


def make_hvp(loss_fn, params, x_train, y_train, *, weight_decay: float | None = None,
    batch_size: int = InfluenceConfig.hvp_batch_size, curvature: str = "hessian", apply=None,
    mesh=None):
    """v -> ∇²L_T(θ) v (flat v), the minibatch-accumulated HVP of the full training objective.

    `loss_fn` is a `train.Objective` or a per-sample loss with `weight_decay`. With
    ``curvature="gauss_newton"`` the product is Jᵀ H_out J v + λv over the logits of
    ``apply(params, x_batch)`` (PSD; the output loss's own Hessian for an `OutputLoss`, and a
    plain loss must be the softmax cross-entropy of apply's logits). With `mesh`, the training
    set is sharded and each product `psum`-ed.

    Returns:
        (hvp, theta): v (P,) -> H v (jitted programs, the data passed as jit arguments, never
        captured as constants) and the flat parameter vector.
    """
    kind = curvature
    checks.check_choice(kind, "curvature", ("hessian", "gauss_newton"))
    objective = train.as_objective(loss_fn, weight_decay)
    choice = _resolve(
        InfluenceConfig(curvature=kind), objective.loss_fn, params, apply, x_train, y_train
    )
    theta = kernels.flatten(objective.loss_fn, params).theta
    be = backend_for(mesh)
    chunks = be.chunks(x_train, y_train, batch_size, theta.dtype)
    data = be.objective(theta, chunks, kernels.num_samples(x_train), objective.weight_decay)
    M = be.matvec(choice.curvature, data)
    return (lambda v: M(v[None])[0]), theta


def _resolve(config, loss_fn, params, apply, x, y):
    return curvature.resolve(config, loss_fn, params, apply, x, y)


def influence_from_solutions(loss_fn, params, U: jax.Array, x_train, y_train, *,
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
    be = backend_for(mesh)
    chunks = be.chunks(x_train, y_train, chunk_size, flat.theta.dtype)
    return be.influence_rows(flat.loss, method, flat.theta, U, chunks, kernels.num_samples(x_train))


def per_sample_gradients(loss_fn, params, x, y) -> jax.Array:
    """All per-sample gradients as an (n, P) matrix (materialised; small problems and tests)."""
    flat = kernels.flatten(loss_fn, params)
    return jax.jit(kernels.per_sample_grads, static_argnums=0)(flat.loss, flat.theta,
        jnp.asarray(x), jnp.asarray(y))


def influence_matrix(loss_fn, params, x_train, y_train, x_val, y_val, *, num_classes: int,
    weight_decay=None, damping, curvature: str = "hessian", rtol=InfluenceConfig.rtol,
    max_steps: int = InfluenceConfig.max_steps, chunk_size: int = InfluenceConfig.chunk_size,
    hvp_batch_size: int = InfluenceConfig.hvp_batch_size):
    """The jittable core: P (N, K) and the CG diagnostics (`linsolve.SolveResult`), in pure JAX.

    The same numbers as `category_influence` with ``solver="cg"``, but no validation, no host
    loops and no algorithm choice, so it composes with `jax.jit`, `jax.vmap` (e.g. over a stack
    of checkpoints' params, to average influence over training) and `jax.grad`. Validate inputs
    with `category_influence` once; use this inside your own transforms.

    Args:
        loss_fn: a `train.Objective`, or a per-sample loss with `weight_decay`; a
            `models.OutputLoss` for ``curvature="gauss_newton"`` (its own output Hessian is used).
        params, x_train, y_train, x_val, y_val: as for `category_influence` (arrays or pytrees;
            every class must be present in y_val: an absent class gives a zero column).
        num_classes, max_steps, chunk_size, hvp_batch_size: static (Python ints).
        weight_decay, damping, rtol: numbers or scalar arrays (may be traced).
        curvature: "hessian" or "gauss_newton" (static).

    Example:
        >>> import jax
        >>> from pareto_jax import influence_matrix, data, models, train
        >>> s = data.stratified_split(data.make_disks("separable", n_per_class=40), seed=0)
        >>> apply, params = models.functional(models.make_model("linear", (2,), 2))
        >>> loss_fn = models.per_sample_loss(apply)
        >>> params = train.train(loss_fn, params, s.train.x, s.train.y).params
        >>> P, res = jax.jit(lambda p: influence_matrix(loss_fn, p, s.train.x, s.train.y, s.val.x,
        ...     s.val.y, num_classes=2, weight_decay=1e-3, damping=1e-4))(params)
        >>> P.shape, bool(res.converged.all())
        ((48, 2), True)
    """
    if isinstance(loss_fn, train.Objective):
        weight_decay, loss_fn = (loss_fn.weight_decay if weight_decay is None else weight_decay,
            loss_fn.loss_fn)
    flat = kernels.flatten(loss_fn, params)
    theta, dt, K = flat.theta, flat.theta.dtype, int(num_classes)
    if curvature == "gauss_newton" and not isinstance(loss_fn, models.OutputLoss):
        raise checks.InputError(
            "argument `loss_fn`: got a plain function; expected a models.OutputLoss for "
            "curvature='gauss_newton'. Fix: pass models.OutputLoss(apply, output_loss)"
        )
    out = None if curvature != "gauss_newton" or loss_fn.is_cross_entropy else loss_fn.output_loss
    curv = _curvature_build(loss_fn, params, curvature, out)  # (`curvature` is the kind here)
    n = kernels.num_samples(x_train)

    def chunks(x, y, size):
        c = kernels.pad_chunks(x, y, size, xp=jnp)
        return kernels.Chunks(kernels.cast_floats(c.x, dt), c.y, c.mask.astype(dt))

    counts = jnp.maximum(jnp.bincount(jnp.asarray(y_val), length=K), 1).astype(dt)
    c = kernels.class_gradient_chunk_size(K, theta.size, dt.itemsize)
    G = kernels.class_gradients(flat.loss, theta, chunks(x_val, y_val, c), counts, K)
    data = kernels.ObjectiveData(theta, chunks(x_train, y_train, hvp_batch_size),
        jnp.asarray(n, dt), jnp.asarray(weight_decay, dt))
    matvec, d = kernels.curvature_matvec(curv, data), jnp.asarray(damping, dt)

    def op(v):
        return matvec(v) + d * v

    def cg(op_, b):  # CG for one right-hand side; its diagnostics as the auxiliary output
        r = linsolve.solve_cg(op_, b, damping=jnp.asarray(0.0, dt),
            rtol=jnp.asarray(linsolve.resolve_rtol(rtol, dt), dt), atol=jnp.asarray(0.0, dt),
            max_steps=int(max_steps))
        return r.value, r

    # custom_linear_solve: reverse-mode derivatives by implicit differentiation (one more solve
    # with the same symmetric operator), where a while_loop alone has none
    U, res = jax.vmap(
        lambda g: jax.lax.custom_linear_solve(op, g, cg, symmetric=True, has_aux=True)
    )(G)
    rows = kernels.influence_rows(flat.loss, "jvp", theta, U, chunks(x_train, y_train, chunk_size))
    return rows.reshape(-1, K)[:n] / n, res


def _curvature_build(loss_fn, params, kind, out):
    """`curvature.build` (the module; a parameter of the callers shadows its name)."""
    apply = loss_fn.apply if kind == "gauss_newton" else None
    return curvature.build(loss_fn, params, kind, apply, out)


def linear_category_influence(params, x_train, y_train, x_val, y_val, *, num_classes: int,
    weight_decay: float, damping: float = NO_DAMPING, weights=None) -> InfluenceResult:
    """`category_influence` for a `LinearClassifier` head, by the closed form (validated).

    `weights`: the per-sample weights the model was trained with (see `linear_influence`).

    Example:
        >>> from pareto_jax import linear_category_influence, data, models, train
        >>> s = data.stratified_split(data.make_disks("overlapping", n_per_class=40), seed=0)
        >>> apply, params = models.functional(models.make_model("linear", (2,), 2))
        >>> params = train.train(models.per_sample_loss(apply), params, s.train.x, s.train.y).params
        >>> r = linear_category_influence(params, s.train.x, s.train.y, s.val.x, s.val.y,
        ...                               num_classes=2, weight_decay=1e-3)
        >>> r.method, r.P.shape
        ('closed_form', (48, 2))
    """
    xt, yt = validation.train_set(x_train, y_train, num_classes)
    xv, yv = validation.val_set(xt, x_val, y_val, num_classes)
    checks.check_all_classes_present(yv, num_classes, "y_val")
    if weights is not None:
        weights = checks.as_weights(weights, xt.shape[0], "weights")
    W, b = params["head"]["kernel"], params["head"]["bias"]
    # the classifier flattens each sample (images, 3-D or 4-D inputs): so does the closed form
    xt, xv = (jnp.reshape(a, (a.shape[0], -1)) for a in (xt, xv))
    if xt.shape[1] != W.shape[0]:
        checks.fail("x_train", f"{xt.shape[1]} features per sample",
            f"{W.shape[0]} (the head's input size)", "pass the inputs the model was built for")
    dt = jnp.asarray(W).dtype
    P, U = closed_form.linear_influence(xt.astype(dt), yt, xv.astype(dt), yv, W, b,
        weight_decay=weight_decay, damping=damping, return_solutions=True, weights=weights)
    checks.check_finite_array(P, "P", "influence: influence matrix (closed form)")
    K = num_classes
    d = W.shape[0]
    # solutions in the flat ordering of ravel_pytree(params), so they compose with the generic path
    flat_U = jax.vmap(lambda u: ravel_pytree({"head": {"bias": u[d], "kernel": u[:d]}})[0])(U)
    z = np.zeros(K)
    return InfluenceResult(P, "closed_form", "cholesky", "hessian", damping, (), z.astype(int), z,
        np.ones(K, bool), np.zeros(K, bool), np.zeros(K, np.int32), flat_U)


def predict_class_loss_change(result: InfluenceResult, weights, *, params=None,
    weight_decay: float | None = None, normalizer: str = "n") -> np.ndarray:
    """First-order change of each class's validation loss when retraining with `weights`.

    ΔL_k ≈ −Σ_i (w_i − 1) P[i, k] for the fixed-N objective (1/N) Σ w_i ℓ_i + (λ/2)‖θ‖².
    With ``normalizer="weights"`` (Σ w ℓ / Σ w) the data term is rescaled against the
    regulariser, which acts as λ → λ·Σw/N; its first-order effect −λ(Σw/N − 1)·u_kᵀθ is added
    (needs `params` and `weight_decay`).

    Example:
        >>> import numpy as np
        >>> from pareto_jax import InfluenceResult, predict_class_loss_change
        >>> P = np.array([[0.2, -0.1], [0.1, 0.3], [-0.4, 0.1]])
        >>> r = InfluenceResult(P, "jvp", "cg", "hessian", 0.0, (), None, None, None, None)
        >>> predict_class_loss_change(r, [1.0, 1.0, 0.0])   # removing sample 2: −(−1)·P[2]
        array([-0.4,  0.1])
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
        delta = delta - weight_decay * (w.sum() / w.size - 1.0) * (
            np.asarray(result.solutions, np.float64) @ theta
        )
    return delta
