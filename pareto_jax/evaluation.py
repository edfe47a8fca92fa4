"""Trying candidate weightings: retraining from a checkpoint, per-class evaluation, fitness,
and the baselines the search is compared with (``docs/method.md``).

A candidate weighting w is tried like the method does: one weighted epoch from the checkpoint
θ^e (or, with ``retrain="converge"``, full-batch L-BFGS to convergence), then per-class
accuracy on validation (used for selection) and test (only reported). `Evaluator` does both,
for one weighting or a whole population at once (`vmap` over the weights, or sharded over a
mesh). `fitness` is the search's selection rule; `baseline_weights`, `evaluate_weightings` and
`harm_matched_baselines` are the comparisons every improvement table reports.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import checks, pareto, train
from .config import BaselineConfig, ReweightConfig

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True, eq=False)
class SearchProblem:
    """What is searched: a checkpoint θ^e of a model and the data splits.

    Attributes:
        loss_fn: per-sample loss; apply: ``apply(params, x_batch) -> logits``.
        state: the checkpoint θ^e (params, optimizer state, epoch e).
        train_config: the config the checkpoint was trained with (one more epoch uses it).
        x_train, y_train, x_val, y_val, x_test, y_test: the splits.
        num_classes: K.
        base_weights: per-sample weights the checkpoint was trained with (None: all ones). A
            candidate's weights w then act multiplicatively: it is trained with base · w (the
            setting of iterated Direct Improvement, where P comes from
            `influence.linear_category_influence(..., weights=base)`).
    """

    loss_fn: Callable
    apply: Callable
    state: train.TrainState
    train_config: train.TrainConfig
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    base_weights: np.ndarray | None = None

    def __post_init__(self):
        for n in ("train", "val", "test"):
            x = checks.as_features(getattr(self, f"x_{n}"), f"x_{n}")
            y = checks.as_labels(getattr(self, f"y_{n}"), f"y_{n}", num_classes=self.num_classes,
                n=x.shape[0], x_name=f"x_{n}")
            object.__setattr__(self, f"x_{n}", x)
            object.__setattr__(self, f"y_{n}", y)
        checks.check_all_classes_present(self.y_val, self.num_classes, "y_val")
        if self.base_weights is not None:
            object.__setattr__(self, "base_weights",
                checks.as_weights(self.base_weights, self.x_train.shape[0], "base_weights"))

    @property
    def objective(self) -> train.Objective:
        """The objective the checkpoint was trained with (`train.Objective.of`)."""
        return train.Objective.of(self.loss_fn, self.train_config)


@functools.lru_cache(maxsize=16)
def _hits_fn(apply, K):
    """Per-class correct counts (int32, (K,)) of `apply` on (x, y): pure, jittable."""

    def hits(params, x, y):
        correct = jnp.argmax(apply(params, x), -1) == y
        return jnp.sum(
            jax.nn.one_hot(y, K, dtype=jnp.int32) * correct[:, None].astype(jnp.int32), 0
        )

    return hits


@functools.lru_cache(maxsize=16)
def _correct_fn(apply):
    """Per-sample correctness (bool, (M, n)) of a stacked population of params: jitted."""
    return jax.jit(
        jax.vmap(
            lambda params, x, y: jnp.argmax(apply(params, x), -1) == y, in_axes=(0, None, None)
        )
    )


def _acc_fn(apply, K):
    """Per-class accuracy; counts are summed as integers and divided in float64 on the host, so
    batched and sequential evaluations agree bit for bit."""
    hits = _hits_fn(apply, K)

    one, many = jax.jit(hits), jax.jit(jax.vmap(hits, in_axes=(0, None, None)))

    def acc(params, x, y):
        counts = np.maximum(np.bincount(np.asarray(y), minlength=K), 1)
        return np.asarray(one(params, x, y), np.float64) / counts

    def acc_batch(params, x, y):
        counts = np.maximum(np.bincount(np.asarray(y), minlength=K), 1)
        return np.asarray(many(params, x, y), np.float64) / counts

    return acc, acc_batch


class Evaluator:
    """Jitted one-epoch training and per-class accuracy, single and batched over weights."""

    def __init__(
        self, problem: SearchProblem, retrain: str = "epoch", max_iter: int = 500, mesh=None
    ):
        self.p = problem
        self.mesh = mesh
        self.retrain = retrain
        n = problem.x_train.shape[0]
        self.epoch = train.make_epoch_fn(problem.loss_fn, problem.train_config, n)
        self.epoch_batch = train.make_epoch_fn(
            problem.loss_fn, problem.train_config, n, population=True
        )
        # "converge": the fixed-N objective, under which the first-order guarantees hold
        fit = train.lbfgs_fit_fn(
            dataclasses.replace(problem.objective, normalizer="n"), int(max_iter), 1e-6
        )
        self.fit = fit
        # L-BFGS iteration counts differ across members: lock-step vmap pays for the slowest,
        # so on CPU the population is looped inside one compiled program instead
        if jax.default_backend() == "cpu" and mesh is None:
            self.fit_batch = jax.jit(lambda p, x, y, W: jax.lax.map(lambda w: fit(p, x, y, w), W))
        else:
            self.fit_batch = jax.jit(jax.vmap(fit, in_axes=(None, None, None, 0)))
        self.acc, self.acc_batch = _acc_fn(problem.apply, problem.num_classes)
        self._gen = {}
        dt = jnp.result_type(*jax.tree_util.tree_leaves(problem.state.params))
        self.dt = dt
        self.x = jnp.asarray(problem.x_train, dt)
        self.y = jnp.asarray(problem.y_train)
        self.xv, self.yv = jnp.asarray(problem.x_val, dt), jnp.asarray(problem.y_val)
        self.xt, self.yt = jnp.asarray(problem.x_test, dt), jnp.asarray(problem.y_test)

    def _scaled(self, W):
        W = np.asarray(W, np.float64)
        return W if self.p.base_weights is None else W * self.p.base_weights

    def generation(self, batch: pareto.ProgramBatch):
        """One GA generation as one jitted call over the population: every member's program on
        the device (the batch's `pareto.device.solve_rows`, P padded as every device solve pads
        it), its weights (all ones where the program failed, times any base weights), its
        weighted epoch from θ^e (vmapped) and its validation hit counts. Returns (the programs'
        `ReweightResult`s, read as `pareto.read` reads every device solve; per-class validation
        accuracies (M, K)).

        Run under float64 (the program needs it); the epochs see the same float32 data and
        params as `train_many`'s.
        """
        n = self.x.shape[0]
        base = (
            np.ones(n)
            if self.p.base_weights is None
            else np.asarray(self.p.base_weights, np.float64)
        )
        s = self.p.state
        with jax.enable_x64(True):
            args, static = batch.device_args()
            key = tuple(sorted(static.items()))
            if key not in self._gen:
                self._gen[key] = _generation_fn(self, **static)
            sol, params, hits = self._gen[key](*args, jnp.asarray(base), s.params, s.opt_state,
                self.x, self.y, self.xv, self.yv, s.epoch)
            sol = jax.tree_util.tree_map(np.asarray, sol)
        counts = np.maximum(np.bincount(np.asarray(self.yv), minlength=self.p.num_classes), 1)
        return pareto.read(batch, sol._replace(w=sol.w[:, :n])), np.asarray(
            hits, np.float64
        ) / counts

    def train_one(self, w):
        return self._train(self._scaled(w))

    def _train(self, w):
        s = self.p.state
        if self.retrain == "converge":
            p, _, _ = self.fit(s.params, self.x, self.y, jnp.asarray(w, self.dt))
            return p, s.opt_state
        p, o, _ = self.epoch(
            s.params, s.opt_state, self.x, self.y, jnp.asarray(w, self.dt), s.epoch
        )
        return p, o

    def train_many(self, W, batched: bool):
        W = self._scaled(W)
        s = self.p.state
        if batched and self.mesh is not None:
            # the population axis sharded over the mesh; everything else replicated
            from . import distributed

            Wd, npop = distributed.shard_population(self.mesh, np.asarray(W, self.dt))
            params, opt_state, x, y = distributed.replicate(
                self.mesh, (s.params, s.opt_state, self.x, self.y)
            )
            if self.retrain == "converge":
                p, _, _ = self.fit_batch(params, x, y, Wd)
                o = None
            else:
                M = Wd.shape[0]
                p, o, _ = self.epoch_batch(train.broadcast_population(params, M),
                    train.broadcast_population(opt_state, M), x, y, Wd, s.epoch)
            cut = lambda t: None if t is None else jax.tree_util.tree_map(lambda a: a[:npop], t)  # noqa: E731
            return cut(p), cut(o)
        if batched and self.retrain == "converge":
            p, _, _ = self.fit_batch(s.params, self.x, self.y, jnp.asarray(W, self.dt))
            return p, None
        if batched:
            M = W.shape[0]
            p, o, _ = self.epoch_batch(train.broadcast_population(s.params, M),
                train.broadcast_population(s.opt_state, M), self.x, self.y, jnp.asarray(W, self.dt),
                s.epoch)
            return p, o
        outs = [self._train(w) for w in W]
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[o[0] for o in outs]), None

    def correct(self, params_batch, split: str = "test") -> np.ndarray:
        """Which samples of a split each member of a stacked population of params gets right
        ((M, n) bool): what the paired (McNemar) tests of the improvement study compare."""
        x, y = (self.xv, self.yv) if split == "val" else (self.xt, self.yt)
        return np.asarray(_correct_fn(self.p.apply)(params_batch, x, y))

    def accuracies(self, params_batch, split: str = "val", batched: bool = True) -> np.ndarray:
        x, y = (self.xv, self.yv) if split == "val" else (self.xt, self.yt)
        if batched:
            return np.asarray(self.acc_batch(params_batch, x, y), np.float64)
        n = jax.tree_util.tree_leaves(params_batch)[0].shape[0]
        return np.stack(
            [
                np.asarray(
                    self.acc(jax.tree_util.tree_map(lambda a: a[i], params_batch), x, y), np.float64
                )
                for i in range(n)
            ]
        )


def _generation_fn(ev: "Evaluator", *, has_budget: bool, qp: bool, rtol: float):
    """The jitted generation of `Evaluator.generation` (programs → weights → epochs → hits)."""
    n = ev.x.shape[0]
    cfg = ev.p.train_config
    fns = train.epoch_fns(ev.p.loss_fn, cfg, n, *train.batches_per_epoch(n, cfg.batch_size))
    hits = _hits_fn(ev.p.apply, ev.p.num_classes)
    dt = ev.dt

    def gen(
        P, C, B, LO, HI, budget, mu, n_valid, base, params, opt_state, x, y, xv, yv, epoch_index
    ):
        sol = pareto.device.solve_rows(
            P, C, B, LO, HI, budget, mu, n_valid, has_budget=has_budget, qp=qp, rtol=rtol
        )
        W = jnp.where((sol.status == 0)[:, None], sol.w[:, :n], 1.0) * base
        M = C.shape[0]
        p, _, _ = jax.vmap(fns.body, in_axes=(0, 0, None, None, 0, None, None))(
            train.broadcast_population(params, M), train.broadcast_population(opt_state, M), x, y,
            W.astype(dt), None, epoch_index)
        return sol, p, jax.vmap(hits, in_axes=(0, None, None))(p, xv, yv)

    return jax.jit(gen)


def relative_change(acc, ref) -> np.ndarray:
    """Δ_k = 100·(acc_k − ref_k)/ref_k (percent; 100·(acc − ref) where ref_k = 0)."""
    acc, ref = np.asarray(acc, np.float64), np.asarray(ref, np.float64)
    return np.where(ref > 0, 100.0 * (acc - ref) / np.where(ref > 0, ref, 1.0), 100.0 * (acc - ref))


def fitness(delta, targets: Sequence[int]) -> tuple[float, float]:
    """(fitness, tie-break): −∞ unless every target improves; else the mean over non-target
    classes of min(Δ_k, 0); the tie-break is the mean target gain."""
    delta = np.asarray(delta)
    t = np.zeros(delta.shape[-1], bool)
    t[list(targets)] = True
    if np.any(delta[t] <= 0):
        return NEG_INF, float(np.mean(delta[t]))
    others = delta[~t]
    return (float(np.mean(np.minimum(others, 0.0))) if others.size else 0.0), float(
        np.mean(delta[t])
    )


def baseline_weights(P, y_train, targets: Sequence[int], num_classes: int,
    config: BaselineConfig = BaselineConfig(), reweight: ReweightConfig = ReweightConfig()
) -> dict[str, np.ndarray]:
    """The baselines of ``docs/method.md`` as weight vectors (each then gets one weighted epoch).

    * unweighted: w = 1 (the ordinary epoch e+1);
    * class_balanced: w_i ∝ 1/count(y_i), mean 1;
    * trim_negative: w_i = 0 where Σ_k P[i, k] < 0;
    * topk_upweight: w_i = `topk_weight` for the top `topk_fraction` of Σ_{t∈targets} P[i, t];
    * fixed_alpha_lp: the program (`reweight`) with α = `fixed_alpha` for every class (no search).
    """
    out = simple_baselines(P, y_train, targets, num_classes, config)
    sol = pareto.solve_reweighting(np.asarray(P, np.float64), targets, config.fixed_alpha, reweight)
    if sol.w is not None:
        out["fixed_alpha_lp"] = sol.w
    return out


def simple_baselines(P, y_train, targets: Sequence[int], num_classes: int,
    config: BaselineConfig = BaselineConfig()) -> dict[str, np.ndarray]:
    """The baselines that need no program (`baseline_weights` without fixed_alpha_lp):
    unweighted, class_balanced, trim_negative, topk_upweight."""
    P = np.asarray(P, np.float64)
    n = P.shape[0]
    y = np.asarray(y_train)
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    cb = 1.0 / counts[y]
    out = {"unweighted": np.ones(n), "class_balanced": cb * n / cb.sum(),
        "trim_negative": (P.sum(1) >= 0).astype(np.float64)}
    score = P[:, list(targets)].sum(1)
    k = max(1, int(round(config.topk_fraction * n)))
    w = np.ones(n)
    w[np.argsort(-score, kind="stable")[:k]] = config.topk_weight
    out["topk_upweight"] = w
    return out


def evaluate_weightings(problem: SearchProblem, weightings: dict[str, np.ndarray], ref_params, *,
    batched: bool = True, retrain: str = "epoch", max_iter: int = 500, mesh=None
) -> dict[str, dict]:
    """Retrain from θ^e per weighting (as the search does); per-class val/test accuracy and Δ,
    and which test samples each retrained model gets right ("test_correct")."""
    ev = Evaluator(problem, retrain, max_iter, mesh)
    names = list(weightings)
    W = np.stack([weightings[n] for n in names])
    params, _ = ev.train_many(W, batched)
    va = ev.accuracies(params, "val", batched)
    te = ev.accuracies(params, "test", batched)
    ok = ev.correct(params, "test")
    rv = np.asarray(ev.acc(ref_params, ev.xv, ev.yv), np.float64)
    rt = np.asarray(ev.acc(ref_params, ev.xt, ev.yt), np.float64)
    return {
        n: {"val_acc": va[i], "test_acc": te[i], "delta_val": relative_change(va[i], rv),
            "delta_test": relative_change(te[i], rt), "test_correct": ok[i]}
        for i, n in enumerate(names)
    }


MATCH_STEPS = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3, 0.22, 0.15, 0.1, 0.06, 0.03, 0.015)


def harm_matched_baselines(problem: SearchProblem, weightings: dict[str, np.ndarray], ref_params,
    targets: Sequence[int], *, steps: Sequence[float] = MATCH_STEPS, batched: bool = True,
    retrain: str = "epoch", max_iter: int = 500, mesh=None) -> dict[str, dict]:
    """Each baseline given the search's own selection rule on validation.

    A baseline's weights w are scaled toward the trained weighting, w_t = 1 + t·(w − 1), for
    each t in `steps`; every w_t is retrained like a search candidate, and the t with the best
    (fitness, tie-break) on validation is kept: the largest target gain among the steps that
    leave no other validation class worse, if any step does. This compares the search with the
    baselines at the same validation harm, which the raw baselines (t = 1) do not respect.

    Returns:
        {name: {"t", "fitness", "val_acc", "test_acc", "delta_val", "delta_test"}}.
    """
    names = [n for n in weightings if n != "unweighted"]
    steps = [float(t) for t in steps]
    if not names or not steps or min(steps) <= 0 or max(steps) > 1:
        checks.fail(
            "steps", repr(steps), "values in (0, 1] and at least one baseline", "keep the default"
        )
    scaled = {
        (n, t): 1.0 + t * (np.asarray(weightings[n], np.float64) - 1.0)
        for n in names
        for t in steps
    }
    got = evaluate_weightings(
        problem, scaled, ref_params, batched=batched, retrain=retrain, max_iter=max_iter, mesh=mesh
    )
    out = {}
    for n in names:
        scored = [(fitness(got[n, t]["delta_val"], targets), t) for t in steps]
        (f, _), t = max(
            scored, key=lambda s: (s[0][0], s[0][1] if np.isfinite(s[0][1]) else NEG_INF)
        )
        out[n] = {"t": t, "fitness": f, **got[n, t]}
    return out
