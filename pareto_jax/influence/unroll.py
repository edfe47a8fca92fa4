"""The exact weight-gradient of a retraining: P_unroll[i, k] = −∂L_k(θ_T(w))/∂w_i at w = 1.

The implicit-function influence P (`front`) describes a model re-converged to the optimum of the
re-weighted objective. What the experiments apply is different: a few weighted epochs of the
training's own optimizer from a checkpoint (its parameters, its optimizer state, its epoch index
and so its batch order). For that procedure θ_T(w) is a differentiable function of the N sample
weights, and so is every class's validation loss L_k(θ_T(w)); its Jacobian at w = 1 is the exact
first-order effect of re-weighting on the step actually taken. P_unroll = −J keeps P's sign
convention: the first-order prediction of a weighting is ΔL_k ≈ −Σ_i P_unroll[i, k] (w_i − 1)
(`stages.predict_class_loss_change` applies to it unchanged), with no N-normaliser correction to
add: the retraining's own normaliser (Σw or N) is differentiated with the rest.

One reverse-mode pass with the K class cotangents at once, through every optimizer step,
rematerialising each step on the way back (`jax.checkpoint`): memory is the parameters and
optimizer state of every step plus one step's activations, not every step's activations. Two
executions, the same numbers: one compiled program (`lax.scan` over the steps, checkpointed;
accelerators, and `mesh=` through `distributed.make_epoch_fn`), or the steps driven from the host
(XLA:CPU, where gradients of convolutions inside a loop are slow; `kernels.loops_on_host`): a
forward pass keeps each step's carry, then a backward pass takes each step's VJP, recomputing
its forward. ``docs/method.md``, "Predictions for the retraining actually applied".
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks, kernels, train
from ..config import TrainConfig
from . import validation
from .result import InfluenceResult


@dataclasses.dataclass(frozen=True, eq=False)
class Retraining:
    """The retraining the weights act through: `epochs` weighted epochs of `config` (optimizer,
    learning rate, batch size, normaliser, seed, weight decay) of `loss_fn` from `state` (params,
    optimizer state, and the epoch index e, so epoch e + j shuffles with ``fold_in(seed, e + j)``:
    the batch order of the actual retraining, which `train.train(..., state=state,
    epochs=epochs)` runs).

    Attributes:
        loss_fn: per-sample ``loss_fn(params, x, y)``.
        config: the `TrainConfig` of the retraining (that of the checkpoint, usually).
        state: the `train.TrainState` it starts from.
        epochs: weighted epochs (>= 1).
        precision: the dtype the retraining and its derivative are computed in: "auto" (the
            state's own; if that is float32 and the derivative overflows, the whole pass again
            in float64, recorded in the result's ``details["precision"]`` with a
            `PrecisionWarning`), "native" (the state's own, an overflow raises) or "float64".
    """

    loss_fn: object
    config: TrainConfig
    state: train.TrainState
    epochs: int = 1
    precision: str = "auto"

    def __post_init__(self):
        validation.loss_callable(self.loss_fn)
        if not isinstance(self.config, TrainConfig):
            checks.fail("config", type(self.config).__name__, "a TrainConfig",
                "pass the retraining's TrainConfig")
        if not isinstance(self.state, train.TrainState):
            checks.fail("state", type(self.state).__name__,
                "a train.TrainState (params, opt_state, epoch)",
                "pass the checkpoint's state, e.g. train.load_checkpoint(...)")
        checks.check_positive(self.epochs, "epochs", integer=True)
        checks.check_choice(self.precision, "precision", PRECISIONS)

    @property
    def objective(self) -> train.Objective:
        return train.Objective.of(self.loss_fn, self.config)


def _class_losses(measure, params, xv, yv, mv, counts, K):
    """(K,) the mean of `measure` over each class of the (padded) validation set."""
    losses = jax.vmap(measure, (None, 0, 0))(params, xv, yv)
    return (jax.nn.one_hot(yv, K, dtype=losses.dtype) * (mv * losses)[:, None]).sum(0) / counts


def _fns(r: Retraining, n: int):
    return train.epoch_fns(r.loss_fn, r.config, n, *train.batches_per_epoch(n, r.config.batch_size))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _compiled(r_key, K, measure, n, params, opt_state, x, y, xv, yv, mv, counts, epoch0, w):
    """The Jacobian (K, N) in one program: the epochs as checkpointed scans, one VJP with K
    cotangents."""
    r = r_key.retraining
    fns = _fns(r, n)

    def theta(w):
        def epoch(carry, e):  # one epoch: its plan (batch order, normaliser), then its steps
            idx, slot, scale = fns.plan(w, None, epoch0 + e)

            @jax.checkpoint
            def scan_step(c, b):
                p_, o_, _ = fns.step(*c, x, y, w, None, b[0], b[1], scale)
                return (p_, o_), None

            return jax.lax.scan(scan_step, carry, (idx, slot))[0], None

        return jax.lax.scan(epoch, (params, opt_state), jnp.arange(r.epochs))[0][0]

    L = lambda w_: _class_losses(measure, theta(w_), xv, yv, mv, counts, K)  # noqa: E731
    losses, vjp = jax.vjp(L, w)
    return losses, jax.vmap(lambda c: vjp(c)[0])(jnp.eye(K, dtype=losses.dtype))


PRECISIONS = ("auto", "native", "float64")


class PrecisionWarning(UserWarning):
    """The unrolled derivative overflowed in float32 and was computed again in float64."""


class _Key:
    """A `Retraining` as a static argument (hashed by identity of its loss and config, and its
    epochs: the state's arrays are passed as arguments, never captured)."""

    def __init__(self, r: Retraining):
        self.retraining = r
        self._k = (r.loss_fn, r.config, r.epochs)

    def __hash__(self):
        return hash(self._k)

    def __eq__(self, other):
        return isinstance(other, _Key) and self._k == other._k


def _split_ints(tree):
    """(float leaves, int leaves, treedef): optimizer states carry integer step counts, which
    have no cotangent."""
    leaves, tdef = jax.tree_util.tree_flatten(tree)
    is_f = [jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact) for a in leaves]
    return ([a for a, f in zip(leaves, is_f) if f], [a for a, f in zip(leaves, is_f) if not f],
        tdef, is_f)


def _join(fl, il, tdef, is_f):
    it_f, it_i = iter(fl), iter(il)
    return jax.tree_util.tree_unflatten(tdef, [next(it_f) if f else next(it_i) for f in is_f])


@functools.lru_cache(maxsize=16)
def _stepped_programs(r_key, K, measure, n):
    """The jitted pieces of the host-driven pass: the plan, a forward step, one step's VJP with K
    cotangents (the step recomputed: its activations are never kept), the final losses' VJP and
    the normaliser's."""
    fns = _fns(r_key.retraining, n)
    plan = jax.jit(lambda w, e: fns.plan(w, None, e))
    step = jax.jit(
        lambda p, o, x, y, w, ib, sb, scale: fns.step(p, o, x, y, w, None, ib, sb, scale)[:2]
    )

    @jax.jit
    def back(p, o, x, y, w, ib, sb, scale, ct_p, ct_of):
        of, oi, tdef, is_f = _split_ints(o)

        def f(p_, of_, w_, scale_):
            p2, o2, _ = fns.step(p_, _join(of_, oi, tdef, is_f), x, y, w_, None, ib, sb, scale_)
            return p2, _split_ints(o2)[0]

        _, vjp = jax.vjp(f, p, of, w, scale)
        return jax.vmap(lambda cp, co: vjp((cp, co)))(ct_p, ct_of)

    @jax.jit
    def losses_vjp(p, xv, yv, mv, counts):
        losses, vjp = jax.vjp(lambda p_: _class_losses(measure, p_, xv, yv, mv, counts, K), p)
        return losses, jax.vmap(lambda c: vjp(c)[0])(jnp.eye(K, dtype=losses.dtype))

    @jax.jit
    def scale_vjp(w, e, ct_scale):
        _, vjp = jax.vjp(lambda w_: fns.plan(w_, None, e)[2], w)
        return jax.vmap(lambda c: vjp(c)[0])(ct_scale)

    return plan, step, back, losses_vjp, scale_vjp


def _stepped(r: Retraining, K, measure, n, X, Y, XV, YV, mv, counts, w):
    """The same Jacobian with the steps driven from the host: forward keeping every step's
    carry, then backward one step's VJP at a time."""
    plan, step, back, losses_vjp, scale_vjp = _stepped_programs(_Key(r), K, measure, n)
    p, o = r.state.params, r.state.opt_state
    plans, carries = [], []
    for e in range(r.epochs):
        idx, slot, scale = plan(w, r.state.epoch + e)
        plans.append((idx, slot, scale))
        for j in range(idx.shape[0]):
            carries.append((p, o))
            p, o = step(p, o, X, Y, w, idx[j], slot[j], scale)
    losses, ct_p = losses_vjp(p, XV, YV, mv, counts)
    ct_of = [jnp.zeros((K, *jnp.shape(a)), jnp.asarray(a).dtype) for a in _split_ints(o)[0]]
    ct_w = jnp.zeros((K, n), w.dtype)
    for e in reversed(range(r.epochs)):
        idx, slot, scale = plans[e]
        ct_scale = jnp.zeros(K, w.dtype)
        for j in reversed(range(idx.shape[0])):
            p, o = carries.pop()
            ct_p, ct_of, cw, cs = back(p, o, X, Y, w, idx[j], slot[j], scale, ct_p, ct_of)
            ct_w, ct_scale = ct_w + cw, ct_scale + cs
        ct_w = ct_w + scale_vjp(w, r.state.epoch + e, ct_scale)
    return losses, ct_w


def _sharded(r: Retraining, K, measure, n, mesh, X, Y, XV, YV, mv, counts, w):
    """The Jacobian through the data-parallel epochs (`distributed.make_epoch_fn`, each step
    rematerialised), differentiated as one function of w."""
    from .. import distributed

    epoch = distributed.make_epoch_fn(r.loss_fn, r.config, n, mesh, remat=True)

    def L(w_):
        p, o = r.state.params, r.state.opt_state
        for e in range(r.epochs):
            p, o, _ = epoch(p, o, X, Y, w_, r.state.epoch + e)
        return _class_losses(measure, p, XV, YV, mv, counts, K)

    losses, vjp = jax.vjp(L, w)
    return losses, jax.vmap(lambda c: vjp(c)[0])(jnp.eye(K, dtype=losses.dtype))


def _in_float64(state: train.TrainState) -> train.TrainState:
    """The state with every float array in float64 (inside ``jax.enable_x64``)."""
    f64 = lambda a: (  # noqa: E731
        jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact)
        else jnp.asarray(a))
    return train.TrainState(jax.tree_util.tree_map(f64, state.params),
        jax.tree_util.tree_map(f64, state.opt_state), state.epoch)


def _run(r: Retraining, K, measure, n, xt, yt, xv, yv, weights, execution, mesh, dt):
    """(class losses, P (N, K) as numpy, whether the steps were driven from the host) in `dt`."""
    X, Y = kernels.cast_floats(xt, dt), jnp.asarray(yt)
    XV, YV = kernels.cast_floats(xv, dt), jnp.asarray(yv)
    mv = jnp.ones(yv.shape[0], dt)
    counts = jnp.asarray(np.maximum(np.bincount(yv, minlength=K), 1), dt)
    w = (
        jnp.ones(n, dt)
        if weights is None
        else jnp.asarray(checks.as_weights(weights, n, "weights"), dt)
    )
    stepped = mesh is None and kernels.loops_on_host(execution)
    if mesh is not None:
        losses, J = _sharded(r, K, measure, n, mesh, X, Y, XV, YV, mv, counts, w)
    elif stepped:
        losses, J = _stepped(r, K, measure, n, X, Y, XV, YV, mv, counts, w)
    else:
        losses, J = _compiled(_Key(r), K, measure, n, r.state.params, r.state.opt_state, X, Y, XV,
            YV, mv, counts, r.state.epoch, w)
    return np.asarray(losses), -np.asarray(J).T, stepped


def _checked(r, x_train, y_train, x_val, y_val, num_classes, measure_fn, class_names, sample_ids):
    """The inputs validated once, before any work: (x_train, y_train, x_val, y_val, measure)."""
    xt, yt = validation.train_set(x_train, y_train, num_classes)
    xv, yv = validation.val_set(xt, x_val, y_val, num_classes)
    validation.groups(None, yv, num_classes, None, class_names)
    validation.class_names_and_ids(class_names, sample_ids, num_classes, checks.num_inputs(xt))
    validation.loss(r.loss_fn, r.state.params, xt, yt)
    measure = r.loss_fn if measure_fn is None else measure_fn
    if measure_fn is not None:
        validation.loss(measure_fn, r.state.params, xv, yv, "measure_fn")
        validation.finite_measure(measure_fn, r.state.params, xv, yv)
    return xt, yt, xv, yv, measure


def unrolled_influence(retraining: Retraining, x_train, y_train, x_val, y_val, *, num_classes: int,
    measure_fn=None, execution: str = "auto", class_names=None, sample_ids=None, mesh=None,
    weights=None) -> InfluenceResult:
    """P_unroll (N, K): the exact weight-gradient of the retraining (module docstring).

    Args:
        retraining: the `Retraining` (loss, TrainConfig, starting state, epochs).
        x_train, y_train: the training set the retraining runs over (row i is weight i).
        x_val, y_val: the validation set; column k is class k's mean loss (or `measure_fn`).
        num_classes: K.
        measure_fn: per-sample ``measure_fn(params, x, y)`` whose class means are differentiated
            (default: the retraining's loss).
        execution: "auto", "compiled" or "stepped" (module docstring; the same numbers).
        class_names, sample_ids: carried into the result.
        mesh: a `distributed` mesh: the epochs run data-parallel (`distributed.make_epoch_fn`)
            and are differentiated through (compiled).
        weights: the weighting w₀ to linearise at (default all ones): P = −∂L_k(θ_T(w))/∂w at
            w₀, and the prediction for w is then −Pᵀ(w − w₀) (the sequential rounds of
            `pareto_jax.rounds` re-linearise at each accepted weighting).

    Returns:
        `InfluenceResult` with ``method="unroll"``, ``solver="unroll"``; its `solutions` are
        None (no curvature is inverted) and `details` holds the class losses after the
        retraining and its step count.

    Example:
        >>> import numpy as np
        >>> from pareto_jax import data, influence, models, train
        >>> s = data.stratified_split(data.make_disks("separable", n_per_class=40), seed=0)
        >>> apply, params = models.functional(models.make_model("mlp", (2,), 2, hidden=(8,)))
        >>> loss_fn = models.per_sample_loss(apply)
        >>> tc = train.TrainConfig(epochs=5, batch_size=16)
        >>> state = train.train(loss_fn, params, s.train.x, s.train.y, tc).state   # θ^e
        >>> r = influence.Retraining(loss_fn, tc, state, epochs=1)    # one more weighted epoch
        >>> res = influence.unrolled_influence(r, s.train.x, s.train.y, s.val.x, s.val.y,
        ...                                    num_classes=2)
        >>> w = np.ones(len(s.train)); w[:5] = 0.0                     # drop five samples
        >>> influence.predict_class_loss_change(res, w).shape          # ≈ the actual change
        (2,)
    """
    r = retraining
    if not isinstance(r, Retraining):
        checks.fail("retraining", type(r).__name__, "an influence.Retraining",
            "wrap the procedure in Retraining(...)")
    checks.check_not_traced((r.state, x_train, x_val), "retraining", "its compiled core (pure JAX)")
    checks.check_positive(num_classes, "num_classes", integer=True)
    xt, yt, xv, yv, measure = _checked(
        r, x_train, y_train, x_val, y_val, num_classes, measure_fn, class_names, sample_ids
    )
    n, K = checks.num_inputs(xt), int(num_classes)
    native = jnp.result_type(*jax.tree_util.tree_leaves(r.state.params))
    args = (K, measure, n, xt, yt, xv, yv, weights, execution, mesh)
    precision = str(np.dtype(native))
    if r.precision != "float64":
        losses, P, stepped = _run(r, *args, native)
    if r.precision == "float64" or (
        r.precision == "auto" and native == jnp.float32 and not np.all(np.isfinite(P))
    ):
        if r.precision == "auto":
            warnings.warn(PrecisionWarning(
                "the unrolled derivative overflowed in float32 (through Adam it can grow by "
                "about lr·(1 − β₁)·λ/ε per step along parameters the data never move); computed "
                "again in float64"), stacklevel=2)
            precision = "float64 (float32 overflowed)"
        else:
            precision = "float64"
        with jax.enable_x64(True):
            losses, P, stepped = _run(dataclasses.replace(r, state=_in_float64(r.state)), *args,
                jnp.float64)
        P = P.astype(native)
    if not np.all(np.isfinite(P)):
        raise checks.NumericalError(
            f"unrolled influence: `P` has {int((~np.isfinite(P)).sum())} non-finite value(s) "
            f"out of {P.size} (the retraining's loss or its derivative overflowed in "
            f"{precision}). Fix: check the loss for overflow; with Adam, the derivative can grow "
            "by about lr·(1 − β₁)·λ/ε per step along parameters the data never move, so use "
            "fewer steps (epochs) or Retraining(precision='float64')."
        )
    steps = r.epochs * train.batches_per_epoch(n, r.config.batch_size)[0]
    z = np.zeros(K)
    details = {"class_losses_after": np.asarray(losses).tolist(), "optimizer_steps": steps,
        "epochs": r.epochs, "execution": "stepped" if stepped else "compiled",
        "precision": precision,
        "linearised_at": "w = 1" if weights is None else "the given weights"}
    return InfluenceResult(jnp.asarray(P), "unroll", "unroll", "none", 0.0, (), np.full(K, steps),
        z, np.ones(K, bool), np.zeros(K, bool), np.zeros(K, np.int32), None, details,
        None if class_names is None else tuple(str(c) for c in class_names),
        np.arange(n) if sample_ids is None else np.asarray(sample_ids))
