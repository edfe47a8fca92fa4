"""A program that re-linearises: sequential trust-region rounds on the exact weight-gradient.

The reweighting program answers for one linearisation of "weights → retrained model → every
class's loss". Here that map is the retraining the experiments apply (one weighted epoch of the
checkpoint's optimizer from θ^e, `Evaluator`), and each round linearises it exactly at the current
weights w with the unrolled estimator (`influence.unrolled_influence(weights=w)`): P_w = −∂L/∂w.

A round: the step is the program on u (w' = w ⊙ u, u ∈ [1 − ρ, min(w_max, 1 + ρ)], so weights
stay non-negative) with the influence matrix diag(w) P_w (so Σ_i u_i (w_i P_ik) is Σ_i w'_i P_ik),
targets maximised and every class keeping the share α of its total predicted influence; the
candidate w' is retrained and accepted if it ranks above the current weighting by the search's
own rule on validation (`evaluation.fitness`: every target improved against the reference, then
the least harm to the others, then the largest mean target gain); otherwise ρ shrinks and the
round is tried again. It stops when ρ falls below `min_rho` (no progress), after `rounds`
accepted steps, or when the ceiling test (`pareto.ceiling_test`) finds no first-order Pareto
improvement at w: the first-order stationarity check of this bilevel problem.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from . import checks, influence, pareto
from .config import RoundsConfig
from .evaluation import NEG_INF, Evaluator, SearchProblem, fitness, relative_change
from .results import pytree_result


@pytree_result(
    data=("weights", "params", "ref_val", "ref_test", "val_acc", "test_acc", "delta_val",
        "delta_test", "test_correct")
)
@dataclasses.dataclass(frozen=True, eq=False)
class RoundsResult:
    """Outcome of `run_rounds`.

    Attributes:
        mode, targets: what was improved.
        weights: the last accepted weights (all ones when no step was accepted).
        params: the model retrained with them (one weighted epoch from θ^e).
        ref_val, ref_test, val_acc, test_acc, delta_val, delta_test: as in `search.SearchResult`.
        fitness, tiebreak: the accepted weighting's rank on validation (`evaluation.fitness`).
        found: some accepted weighting improves every target on validation.
        history: per round: ρ tried, the program's status, the candidate's fitness, accepted,
            the ceiling test's t* at the current weights, seconds.
        stop: why the rounds ended.
        test_correct: which test samples the final model gets right.
    """

    mode: str
    targets: tuple[int, ...]
    weights: np.ndarray
    params: Any
    ref_val: np.ndarray
    ref_test: np.ndarray
    val_acc: np.ndarray
    test_acc: np.ndarray
    delta_val: np.ndarray
    delta_test: np.ndarray
    fitness: float
    tiebreak: float
    found: bool
    history: tuple[dict, ...]
    stop: str
    test_correct: np.ndarray | None = None


def _rank(f, tb):
    return (f, tb if np.isfinite(tb) else NEG_INF)


def run_rounds(problem: SearchProblem, targets, *, config: RoundsConfig = RoundsConfig(),
    mode: str = "direct", ref_params=None, out=None) -> RoundsResult:
    """Sequential re-linearised trust-region rounds (module docstring) on a checkpoint.

    Args:
        problem: the checkpoint θ^e and the data (`evaluation.SearchProblem`); each candidate is
            retrained by one weighted epoch from θ^e, as the search's are.
        targets: the classes to improve.
        config: `RoundsConfig`.
        mode: "direct" (reference θ^e) or "course_correction" (reference `ref_params`).
        ref_params: the reference model for Course Correction.
        out: a stream for one line per round (None: silent).

    Returns:
        `RoundsResult`; `found` is False when no accepted weighting improves every target on
        validation (the weights are then all ones, never silently presented as an improvement).

    Example:
        >>> from pareto_jax import data, evaluation, models, rounds, train
        >>> from pareto_jax.config import RoundsConfig
        >>> s = data.stratified_split(data.make_disks("overlapping", n_per_class=60), seed=0)
        >>> apply, params = models.functional(models.make_model("mlp", (2,), 2, hidden=(8,)))
        >>> loss_fn, tc = models.per_sample_loss(apply), train.TrainConfig(epochs=3, batch_size=16)
        >>> state = train.train(loss_fn, params, s.train.x, s.train.y, tc).state
        >>> prob = evaluation.SearchProblem(loss_fn, apply, state, tc, s.train.x, s.train.y,
        ...                                 s.val.x, s.val.y, s.test.x, s.test.y, 2)
        >>> r = rounds.run_rounds(prob, [0], config=RoundsConfig(rounds=2))
        >>> r.weights.shape, r.stop != ""
        ((72,), True)
    """
    checks.check_choice(mode, "mode", ("direct", "course_correction"))
    K = problem.num_classes
    targets = checks.as_class_indices(targets, K)
    if mode == "course_correction" and ref_params is None:
        checks.fail("ref_params", "None", "the ordinary epoch e+1 params", "pass ref_params")
    ev = Evaluator(problem, "epoch")
    ref = problem.state.params if mode == "direct" else ref_params
    ref_val = np.asarray(ev.acc(ref, ev.xv, ev.yv), np.float64)
    n = problem.x_train.shape[0]
    retraining = influence.Retraining(
        problem.loss_fn, problem.train_config, problem.state, epochs=1
    )

    def tried(w):
        params, _ = ev.train_one(w)
        acc = np.asarray(ev.acc(params, ev.xv, ev.yv), np.float64)
        d = relative_change(acc, ref_val)
        return (*fitness(d, targets), params, acc)

    w = np.ones(n)
    cur = tried(w)
    rho, history, stop = config.rho, [], "rounds exhausted"
    for _ in range(config.rounds):
        actual = _base(problem) * w  # the weights the retraining applies
        P = np.asarray(
            influence.unrolled_influence(retraining, problem.x_train, problem.y_train,
                problem.x_val, problem.y_val, num_classes=K, weights=actual).P,
            np.float64,
        )
        Pw = P * actual[:, None]  # in u, the program's P: Σ_i u_i (w_i P_ik) = Σ_i w'_i P_ik
        ceiling = pareto.ceiling_test(Pw, throw=False)
        if ceiling.status == 0 and not ceiling.improvable:
            stop = "stationary: no first-order Pareto improvement at the current weights"
            break
        accepted = False
        while rho >= config.min_rho and not accepted:
            t0 = time.perf_counter()
            sol = pareto.solve_reweighting(Pw, targets, config.alpha, config.reweight, rho=rho)
            rec = {"rho": rho, "status": sol.status, "t_star": ceiling.t_star}
            if sol.w is not None:
                cand = tried(w * sol.w)
                accepted = _rank(*cand[:2]) > _rank(*cur[:2])
                rec.update(fitness=cand[0], tiebreak=cand[1], accepted=accepted)
                if accepted:
                    w, cur = w * sol.w, cand
            history.append({**rec, "seconds": time.perf_counter() - t0})
            if out is not None:
                print(
                    f"  round: ρ {rho:.3g}, status {sol.status}, fitness {rec.get('fitness')}, "
                    f"accepted {accepted}",
                    file=out,
                )
            if not accepted:
                rho *= config.shrink
        if not accepted:
            stop = f"no progress: the trust region shrank below {config.min_rho}"
            break
    return _result(mode, targets, w, cur, ev, ref, ref_val, history, stop)


def _base(problem: SearchProblem) -> np.ndarray:
    """The weights the checkpoint's candidates act on (`SearchProblem.base_weights`)."""
    n = problem.x_train.shape[0]
    return (
        np.ones(n) if problem.base_weights is None else np.asarray(problem.base_weights, np.float64)
    )


def _result(mode, targets, w, cur, ev: Evaluator, ref, ref_val, history, stop) -> RoundsResult:
    import jax

    f, tb, params, val_acc = cur
    ref_test = np.asarray(ev.acc(ref, ev.xt, ev.yt), np.float64)
    test_acc = np.asarray(ev.acc(params, ev.xt, ev.yt), np.float64)
    correct = ev.correct(jax.tree_util.tree_map(lambda a: a[None], params), "test")[0]
    return RoundsResult(mode, tuple(targets), w, params, ref_val, ref_test, val_acc, test_acc,
        relative_change(val_acc, ref_val), relative_change(test_acc, ref_test), f, tb,
        bool(np.isfinite(f)), tuple(history), stop, correct)
