"""Training with per-sample weights (per-class evaluation: `pareto_jax.metrics`, re-exported).

The objective for weights w (docs/method.md) is

    L_w(θ) = s · (1/N) Σ_i w_i ℓ(z_i; θ) + (λ/2)‖θ‖²,

with s = N / Σ_i w_i (``normalizer="weights"``: the weighted mean Σ w ℓ / Σ w, the default) or
s = 1 (``normalizer="n"``: N fixed, the normaliser under which the influence identity is exact).
Weights of 1 give exactly the unweighted mean loss. A minibatch B estimates the data term by
s · Σ_{i∈B} w_i ℓ_i / |B|.

A whole epoch is one jitted `lax.scan` over shuffled minibatches (the last one padded and
masked), so shapes are static: one compilation per (model, data shape, batch size), reused for
every epoch, every call and every weight vector; `vmap` over weights trains a population at once.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import checks, io, kernels
from .config import NORMALIZERS, TrainConfig
from .metrics import ClassMetrics, evaluate, predict  # noqa: F401  (re-exported)
from .results import pytree_result

LossFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Objective:
    """The training objective, the one record of it (module docstring):

        L_w(θ) = s · (1/N) Σ_i w_i ℓ(z_i; θ) + (λ/2)‖θ‖²,   s = N / Σ w (normalizer "weights") or 1
        ("n").

    Training builds it from its `TrainConfig` (`Objective.of`), and the same record is what
    influence (its curvature is this objective's at w = 1), the evaluator's retraining, the
    L-BFGS refit and the unrolled estimator take: λ is never copied by hand. Hashable (a static
    argument of jitted programs) when its loss is.

    Attributes:
        loss_fn: per-sample ``loss_fn(params, x, y)`` (x unbatched).
        weight_decay: λ.
        normalizer: "weights" or "n".

    Example:
        >>> import jax.numpy as jnp
        >>> from pareto_jax import Objective, TrainConfig, models
        >>> apply, params = models.functional(models.make_model("linear", (2,), 2))
        >>> obj = Objective.of(models.per_sample_loss(apply), TrainConfig(weight_decay=1e-2))
        >>> x, y = jnp.ones((4, 2)), jnp.array([0, 1, 0, 1])
        >>> float(obj.value(params, x, y, jnp.ones(4)))    # log 2 at the zero-initialised head
        0.6931...
    """

    loss_fn: LossFn
    weight_decay: float = TrainConfig.weight_decay
    normalizer: str = TrainConfig.normalizer

    def __post_init__(self):
        if not callable(self.loss_fn):
            checks.fail("loss_fn", type(self.loss_fn).__name__,
                "a function (params, x, y) -> scalar", "pass e.g. models.per_sample_loss(apply)")
        checks.check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        checks.check_choice(self.normalizer, "normalizer", NORMALIZERS)
        object.__setattr__(self, "weight_decay", float(self.weight_decay))

    @classmethod
    def of(cls, loss_fn: LossFn, config: TrainConfig) -> "Objective":
        """The objective that `config` trains `loss_fn` with."""
        return cls(loss_fn, config.weight_decay, config.normalizer)

    def value(self, params, x, y, w) -> jax.Array:
        """L_w(θ) on the full batch (x, y) with weights w."""
        return weighted_objective(self.loss_fn, params, x, y, w, weight_decay=self.weight_decay,
            normalizer=self.normalizer)


def as_objective(loss_fn, weight_decay=None) -> Objective:
    """An `Objective` from an `Objective` (weight_decay must then be None or the same λ), or from
    a per-sample loss and its λ (the front doors' two ways in)."""
    if isinstance(loss_fn, Objective):
        if weight_decay is not None and float(weight_decay) != loss_fn.weight_decay:
            checks.fail("weight_decay", repr(weight_decay),
                f"None (the objective's own λ = {loss_fn.weight_decay})",
                "drop weight_decay=, or pass the objective with the λ it was trained with")
        return loss_fn
    if weight_decay is None:
        checks.fail(
            "weight_decay",
            "None",
            "the λ the model was trained with (it is part of the curvature)",
            "pass weight_decay=, or pass train.Objective.of(loss_fn, train_config) instead of "
            "loss_fn",
        )
    return Objective(loss_fn, weight_decay, "n")


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    epoch: int


# Adam's ε inside the square root: √(ν + ε_root). At ν = 0 (a parameter whose gradient is zero at
# every step, e.g. a linear model's weight on an always-blank pixel from a zero start) √ν has an
# infinite derivative, and the unrolled influence's reverse pass through the steps gave NaN for
# every sample. 1e-30 changes no update that matters (ε = 1e-8 sits outside the root).
ADAM_EPS_ROOT = 1e-30


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    if config.optimizer == "adam":
        return optax.adam(config.learning_rate, eps_root=ADAM_EPS_ROOT)
    if config.optimizer == "sgd":
        return optax.sgd(config.learning_rate, momentum=config.momentum)
    return optax.sgd(config.learning_rate)


def l2(params) -> jax.Array:
    return sum(jnp.vdot(p, p) for p in jax.tree_util.tree_leaves(params))


def weighted_objective(
    loss_fn: LossFn, params, x, y, w, *, weight_decay: float, normalizer: str = "weights"
) -> jax.Array:
    """The full-batch training objective L_w(θ) (see the module docstring)."""
    losses = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, x, y)
    scale = 1.0 / (jnp.sum(w) if normalizer == "weights" else kernels.num_samples(x))
    return scale * jnp.sum(w * losses) + 0.5 * weight_decay * l2(params)


def batches_per_epoch(n: int, batch_size: int | None) -> tuple[int, int]:
    b = n if batch_size is None or batch_size >= n else batch_size
    return -(-n // b), b


class EpochFns(NamedTuple):
    """The pieces of one weighted epoch (pure, not jitted).

    plan(w, mask, epoch_index) -> (idx, slot, scale): the shuffled minibatch indices
        (num_batches, batch), their 0/1 slots and the normaliser;
    step(params, opt_state, x, y, w, mask, ib, sb, scale) -> (params, opt_state, data_loss):
        one optimizer step on minibatch ib;
    body(params, opt_state, x, y, w, mask, epoch_index) -> (params, opt_state, mean_loss): plan,
        then `lax.scan` over the steps (one compiled program).
    """

    plan: Callable
    step: Callable
    body: Callable


def epoch_fns(loss_fn: LossFn, config: TrainConfig, m: int, num_batches: int, batch: int, *,
    axis_name: str | None = None, num_devices: int = 1, remat: bool = False) -> EpochFns:
    """The weighted epoch over the m samples this device holds (see `EpochFns`).

    The samples are shuffled with ``fold_in(seed, epoch_index)`` and cut into `num_batches`
    minibatches of `batch` slots (the last padded, masked). With ``mask=None`` (one device) the
    objective is exactly the module docstring's, the L2 term differentiated with the data term.
    Inside `jax.shard_map` (``axis_name`` set, `mask` marking this device's real samples)
    every device draws its own share of each minibatch (shuffling with the device index folded
    in when there are several), the data term's gradient and loss are `psum`-ed over the axis,
    and λθ is added once: `pareto_jax.distributed.make_epoch_fn` wraps this same body. With
    `remat`, each step of the body's scan is rematerialised under reverse mode (`jax.checkpoint`:
    the unrolled influence differentiates through the epochs with one step's activations alive).
    """
    opt = make_optimizer(config)
    objective = Objective.of(loss_fn, config)
    wd, norm, seed = objective.weight_decay, objective.normalizer, config.seed
    psum = (
        (lambda a: a) if axis_name is None else functools.partial(jax.lax.psum, axis_name=axis_name)
    )

    def batch_loss(params, xb, yb, wb, mb, scale):
        losses = jax.vmap(loss_fn, in_axes=(None, 0, 0))(params, xb, yb)
        if axis_name is None:
            data = scale * jnp.sum(mb * wb * losses) / jnp.sum(mb)
            return data + 0.5 * wd * l2(params), data
        data = scale * jnp.sum(mb * wb * losses) / jnp.maximum(psum(jnp.sum(mb)), 1.0)
        return data, data

    def plan(w, mask, epoch_index):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch_index)
        if num_devices > 1:
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        perm = jax.random.permutation(key, m) if num_batches > 1 else jnp.arange(m)
        pad = num_batches * batch - m
        idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(num_batches, batch)
        slot = jnp.concatenate([jnp.ones((m,), w.dtype), jnp.zeros((pad,), w.dtype)]).reshape(
            num_batches, batch
        )
        if mask is None:
            scale = m / jnp.sum(w) if norm == "weights" else jnp.asarray(1.0, w.dtype)
        else:
            scale = (
                psum(jnp.sum(mask)) / psum(jnp.sum(w * mask))
                if norm == "weights"
                else jnp.asarray(1.0, w.dtype)
            )
        return idx, slot, scale

    def step(params, opt_state, x, y, w, mask, ib, sb, scale):
        mb = sb if mask is None else sb * mask[ib]
        (_, data), g = jax.value_and_grad(batch_loss, has_aux=True)(
            params, kernels.take(x, ib), y[ib], w[ib], mb, scale
        )
        if axis_name is not None:
            g = jax.tree_util.tree_map(lambda gi, p: gi + wd * p, psum(g), params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, psum(data)

    def body(params, opt_state, x, y, w, mask, epoch_index):
        idx, slot, scale = plan(w, mask, epoch_index)

        def scan_step(carry, batch_):
            p, o, d = step(*carry, x, y, w, mask, *batch_, scale)
            return (p, o), d

        if remat:
            scan_step = jax.checkpoint(scan_step)
        (params, opt_state), losses = jax.lax.scan(scan_step, (params, opt_state), (idx, slot))
        return params, opt_state, jnp.mean(losses)

    return EpochFns(plan, step, body)


class _SteppedEpoch:
    """An epoch with its minibatch loop on the host, each step one jitted program (the same
    `EpochFns.step`); for XLA:CPU, where gradients of convolutions inside a compiled loop are
    slow (`kernels.loops_on_host`). With ``population`` it trains a stack of weightings at once
    (the step `vmap`-ed over the members' params, optimizer states and weights)."""

    def __init__(self, fns: EpochFns, population: bool):
        self.population = population
        ax = 0 if population else None
        plan = lambda w, e: fns.plan(w, None, e)  # noqa: E731
        step = lambda p, o, x, y, w, ib, sb, sc: fns.step(p, o, x, y, w, None, ib, sb, sc)  # noqa: E731
        self.plan = jax.jit(jax.vmap(plan, (0, None)) if population else plan)
        self.step = jax.jit(
            jax.vmap(step, (ax, ax, None, None, ax, None, None, ax)) if population else step
        )

    def __call__(self, params, opt_state, x, y, w, epoch_index):
        idx, slot, scale = self.plan(w, epoch_index)
        if self.population:  # the plan does not depend on w: one copy of the indices
            idx, slot = idx[0], slot[0]
        losses = []
        for j in range(idx.shape[0]):
            params, opt_state, d = self.step(params, opt_state, x, y, w, idx[j], slot[j], scale)
            losses.append(d)
        return params, opt_state, jnp.mean(jnp.stack(losses), axis=0)


def make_epoch_fn(loss_fn: LossFn, config: TrainConfig, n: int, *, population: bool = False,
    execution: str = "auto"):
    """One weighted epoch: ``epoch(params, opt_state, x, y, w, epoch_index) -> (params, opt_state,
    mean_loss)``.

    Data and params are arguments (never captured constants). Shapes are static in n and the
    batch size, so it compiles once and is reused for every epoch, call and weight vector.
    With ``population=True``, w is a stack (M, n) of weightings trained at once, and params and
    optimizer state carry a leading M axis (one member each; see `broadcast_population`).
    `execution`: "compiled"
    (one jitted `lax.scan` over the minibatches), "stepped" (the loop on the host over one
    jitted step) or "auto" (stepped on CPU, see `kernels.loops_on_host`); both run the same
    step.
    """
    fns = epoch_fns(loss_fn, config, n, *batches_per_epoch(n, config.batch_size))
    if kernels.loops_on_host(execution):
        return _SteppedEpoch(fns, population)

    def epoch(params, opt_state, x, y, w, epoch_index):
        return fns.body(params, opt_state, x, y, w, None, epoch_index)

    return jax.jit(jax.vmap(epoch, in_axes=(0, 0, None, None, 0, None)) if population else epoch)


def broadcast_population(tree, size: int):
    """`size` copies of a pytree along a new leading axis (a population's starting point)."""
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (size, *jnp.shape(a))), tree)


@pytree_result(data=("state",))
@dataclasses.dataclass(frozen=True)
class TrainResult:
    state: TrainState
    history: tuple[float, ...]
    checkpoints: dict

    @property
    def params(self):
        return self.state.params


def _prepare(x, y, weights, num_classes):
    x = checks.as_inputs(x, "x_train")
    n = checks.num_inputs(x)
    y = checks.as_labels(y, "y_train", num_classes=num_classes, n=n, x_name="x_train")
    w = np.ones(n) if weights is None else checks.as_weights(weights, n, "weights")
    return x, y, w


def init_state(params, config: TrainConfig) -> TrainState:
    return TrainState(params, make_optimizer(config).init(params), 0)


def checkpoint_path(run_dir: str | Path, epoch: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"epoch_{epoch:04d}.npz"


def save_checkpoint(run_dir: str | Path, state: TrainState, config: TrainConfig) -> Path:
    p = checkpoint_path(run_dir, state.epoch)
    io.save_pytree(p, {"params": state.params, "opt_state": state.opt_state}, epoch=state.epoch)
    io.write_json(p.with_suffix(".json"), {"epoch": state.epoch, "train_config": config})
    return p


def load_checkpoint(path: str | Path, template: TrainState) -> TrainState:
    tree, extra = io.load_pytree(path, {"params": template.params, "opt_state": template.opt_state})
    tree = jax.tree_util.tree_map(jnp.asarray, tree)
    return TrainState(tree["params"], tree["opt_state"], int(extra["epoch"]))


def train(loss_fn: LossFn, params, x, y, config: TrainConfig = TrainConfig(), *,
    num_classes: int | None = None, weights=None, state: TrainState | None = None,
    epochs: int | None = None, run_dir: str | Path | None = None, progress: bool = False,
    epoch_fn=None) -> TrainResult:
    """Train with per-sample weights; optionally continue from `state` and save checkpoints.

    Args:
        loss_fn: per-sample ``loss_fn(params, x, y)``.
        params: initial params (ignored when `state` is given).
        x, y: training features and integer labels.
        config: a `TrainConfig`.
        num_classes: for label validation.
        weights: per-sample weights w >= 0 (default all ones).
        state: continue from this state (e.g. a loaded checkpoint at epoch e).
        epochs: how many epochs to run (default `config.epochs`).
        run_dir: where checkpoints at `config.checkpoint_epochs` are written.
        progress: show a progress bar.
        epoch_fn: a prebuilt `make_epoch_fn` result to reuse (no rebuild).

    Returns:
        `TrainResult` with the final state, per-epoch mean training loss and checkpoint paths.
    """
    from tqdm.auto import tqdm

    x, y, w = _prepare(x, y, weights, num_classes)
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params if state is None else state.params))
    st = init_state(params, config) if state is None else state
    ep_fn = epoch_fn or make_epoch_fn(loss_fn, config, checks.num_inputs(x))
    xd, yd, wd = kernels.cast_floats(x, dtype), jnp.asarray(y), jnp.asarray(w, dtype)
    n_ep = config.epochs if epochs is None else epochs
    history, ckpts = [], {}
    p, o = st.params, st.opt_state
    import sys

    tty = sys.stderr.isatty()  # in a log file: a line every 10 s at most, not one per refresh
    bar = tqdm(range(st.epoch, st.epoch + n_ep), disable=not progress, desc="train", unit="epoch",
        mininterval=0.1 if tty else 10.0, ascii=not tty)
    for e in bar:
        p, o, loss = ep_fn(p, o, xd, yd, wd, e)
        loss = float(loss)
        if not np.isfinite(loss):
            raise checks.NumericalError(
                f"training: the loss became {loss} at epoch {e + 1}. Fix: lower learning_rate "
                "or raise weight_decay."
            )
        history.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if run_dir is not None and (e + 1) in config.checkpoint_epochs:
            ckpts[e + 1] = str(save_checkpoint(run_dir, TrainState(p, o, e + 1), config))
    return TrainResult(TrainState(p, o, st.epoch + n_ep), tuple(history), ckpts)


def train_one_epoch_from(
    loss_fn: LossFn, state: TrainState, x, y, weights, config: TrainConfig, *, epoch_fn=None
) -> TrainState:
    """Train one weighted epoch from a checkpoint state θ^e (the search's inner step).

    With all-ones weights this is exactly the ordinary epoch e+1 (same batch order).
    """
    return train(
        loss_fn, None, x, y, config, weights=weights, state=state, epochs=1, epoch_fn=epoch_fn
    ).state


@functools.lru_cache(maxsize=32)
def lbfgs_fit_fn(objective: Objective, max_iter: int, tol: float):
    """The jitted full-batch L-BFGS fit of `objective`, one per (objective, settings): repeated
    `fit_lbfgs` calls with the same objective (e.g. a deletion sweep's refits) reuse its compiled
    program."""
    opt = optax.lbfgs()

    def fit(params, x, y, w):
        def obj(p):
            return objective.value(p, x, y, w)

        vg = optax.value_and_grad_from_state(obj)

        def step(carry):
            p, s = carry
            v, g = vg(p, state=s)
            u, s = opt.update(g, s, p, value=v, grad=g, value_fn=obj)
            return optax.apply_updates(p, u), s

        def cond(carry):
            _, s = carry
            it = optax.tree_utils.tree_get(s, "count")
            g = optax.tree_utils.tree_get(s, "grad")
            err = optax.tree_utils.tree_norm(g)
            return (it == 0) | ((it < max_iter) & (err >= tol))

        p, s = jax.lax.while_loop(cond, step, (params, opt.init(params)))
        g = optax.tree_utils.tree_get(s, "grad")
        return p, optax.tree_utils.tree_get(s, "count"), optax.tree_utils.tree_norm(g)

    return jax.jit(fit)


def fit_lbfgs(
    objective: Objective, params, x, y, *, weights=None, max_iter: int = 1000, tol: float = 1e-6
):
    """Minimise the full-batch weighted objective L_w(θ) with optax's L-BFGS (zoom line search).

    For convex models this is "retraining to convergence": the reference the influence
    predictions are checked against. Returns (params, iterations, final gradient norm).
    """
    if not isinstance(objective, Objective):
        checks.fail("objective", type(objective).__name__,
            "a train.Objective (loss, λ, normaliser)",
            "pass train.Objective(loss_fn, weight_decay, normalizer='n')")
    x = checks.as_features(x, "x")
    w = np.ones(x.shape[0]) if weights is None else checks.as_weights(weights, x.shape[0])
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(params))
    fit = lbfgs_fit_fn(objective, int(max_iter), float(tol))
    p, it, gn = fit(params, jnp.asarray(x, dtype), jnp.asarray(y), jnp.asarray(w, dtype))
    return p, int(it), float(gn)
