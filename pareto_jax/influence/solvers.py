"""The inverse-curvature solvers as objects with one signature (the shape lineax uses).

A solver is a frozen value holding its own settings (tolerances, step caps, a preconditioner);
``state = solver.init(operator)`` does what depends only on the operator (K-FAC's factors), and
``solver.solve(state, G, damping)`` returns a `linsolve.SolveResult` (value, steps, residual,
converged, negative curvature, status) for the K right-hand sides G (K, P). `damping` is δ, added
to the curvature of the training objective (which already holds λ), for every solver.

The `Operator` is what a backend (`backend.Local`, `sharded.Sharded`) offers: the curvature,
the placed objective, its product and, on demand, the K-FAC factors. Every backend offers every
solver. `from_config` builds the solver an `InfluenceConfig` names (the names are
`config.SOLVERS`, defined once).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple

import numpy as np

from .. import checks, kfac, linsolve
from .. import config as _config
from ..config import InfluenceConfig
from ..kernels import Curvature, ObjectiveData
from . import selection


class Operator(NamedTuple):
    """The curvature operator of the training objective, as a backend placed it.

    backend: runs the products and solves. curvature: which curvature. data: the placed
    objective (θ, training chunks, N, λ). matvec: V (K, P) -> (H + λI) V. factors: a function
    computing the K-FAC / EK-FAC factors of the training set (None where they cannot be made:
    no nnx model given)."""

    backend: Any
    curvature: Curvature
    data: ObjectiveData
    matvec: Callable
    factors: Callable[[], kfac.Factors] | None = None


class State(NamedTuple):
    """What `init` made: the operator, the factors (K-FAC, EK-FAC, preconditioned CG) and
    diagnostics for the result's details."""

    operator: Operator
    factors: kfac.Factors | None = None
    details: dict | None = None


def _factors(op: Operator, saved) -> kfac.Factors:
    if saved is not None:
        return saved
    if op.factors is None:  # (the front door checks for a model before any work)
        raise ValueError("K-FAC / EK-FAC factors need the nnx model")
    return op.factors()


@dataclasses.dataclass(frozen=True)
class CG:
    """Conjugate gradient on the exact curvature product, each class stopping on its own relative
    residual; preconditioned by the K-FAC / EK-FAC factors when `preconditioner` is set (the
    stopping rule stays on the true residual, so the answer is CG's, only faster)."""

    rtol: float | str = InfluenceConfig.rtol
    atol: float = InfluenceConfig.atol
    max_steps: int = InfluenceConfig.max_steps
    preconditioner: str = InfluenceConfig.preconditioner

    def init(self, op: Operator, *, factors=None) -> State:
        if self.preconditioner == "none":
            return State(op)
        return State(op, _factors(op, factors))

    def solve(self, state: State, G, damping) -> linsolve.SolveResult:
        op = state.operator
        rtol = linsolve.resolve_rtol(self.rtol, G.dtype)
        return op.backend.solve("cg", op.curvature, op.data, G, damping, rtol, self.atol,
            self.max_steps, factors=state.factors, ekfac=self.preconditioner == "ekfac")


@dataclasses.dataclass(frozen=True)
class Dense:
    """The dense reference: the curvature materialised and solved directly (small models);
    `rtol` / `atol` only decide `converged`."""

    rtol: float | str = InfluenceConfig.rtol
    atol: float = InfluenceConfig.atol

    def init(self, op: Operator, *, factors=None) -> State:
        del factors
        return State(op)

    def solve(self, state: State, G, damping) -> linsolve.SolveResult:
        op = state.operator
        rtol = linsolve.resolve_rtol(self.rtol, G.dtype)
        return op.backend.solve("dense", op.curvature, op.data, G, damping, rtol, self.atol, 1)


@dataclasses.dataclass(frozen=True)
class LiSSA:
    """LiSSA (`linsolve.solve_lissa`): the stochastic Neumann recursion on one training chunk per
    draw, scaled by 1.2 λ_max (power iteration on the damped operator); its residual is then
    measured against the full operator."""

    rtol: float | str = InfluenceConfig.rtol
    max_steps: int = InfluenceConfig.max_steps
    seed: int = InfluenceConfig.seed

    def init(self, op: Operator, *, factors=None) -> State:
        del factors
        return State(op, None, {})

    def solve(self, state: State, G, damping) -> linsolve.SolveResult:
        op = state.operator
        theta = op.data.theta
        blk = selection.block(op.matvec, op.data.mask)  # (a selection's identity taken out)
        lam = linsolve.power_iteration(
            lambda v: blk(v[None])[0] + damping * v, theta.size, theta.dtype, seed=self.seed
        )
        state.details.update(lissa_scale=1.2 * lam, lambda_max=lam)
        res = op.backend.lissa(op.curvature, op.data, G, scale=1.2 * lam, damping=damping,
            rtol=linsolve.resolve_rtol(self.rtol, G.dtype), max_steps=self.max_steps, seed=self.seed
        )
        return linsolve.with_residual(res, op.matvec, G, damping)


@dataclasses.dataclass(frozen=True)
class KFAC:
    """K-FAC (`ekfac=False`) or EK-FAC (`ekfac=True`): the factored Gauss-Newton + λI inverted
    exactly per layer (status APPROXIMATE); with `report_residual`, the solution's residual
    against the chosen curvature is measured too."""

    ekfac: bool = False
    report_residual: bool = InfluenceConfig.report_residual

    def init(self, op: Operator, *, factors=None) -> State:
        return State(op, _factors(op, factors))

    def solve(self, state: State, G, damping) -> linsolve.SolveResult:
        res = kfac.solve_kfac(state.factors, G, damping=damping, ekfac=self.ekfac)
        if self.report_residual:
            res = linsolve.with_residual(res, state.operator.matvec, G, damping)
        return res


_MAKERS: dict[str, Callable[[InfluenceConfig], Any]] = {
    "cg": lambda c: CG(c.rtol, c.atol, c.max_steps, c.preconditioner),
    "dense": lambda c: Dense(c.rtol, c.atol), "lissa": lambda c: LiSSA(c.rtol, c.max_steps, c.seed),
    "kfac": lambda c: KFAC(False, c.report_residual),
    "ekfac": lambda c: KFAC(True, c.report_residual)}
assert set(_MAKERS) == set(_config.SOLVERS), "every solver name has a solver object"


def from_config(config: InfluenceConfig):
    """The solver object `config.solver` names, with the config's settings."""
    return _MAKERS[config.solver](config)


class DampingWarning(UserWarning):
    """The damping was raised above the one set, because a solve met negative curvature,
    diverged or was not finite: P then answers for the more damped curvature. The result's
    `damping` and `escalations` say from what to what and why."""


ESCALATION_TRIES = 12  # ×10 each: from the 1e-6 floor up to 1e5


def solve_damped(solver, state: State, G, damping: float, config: InfluenceConfig):
    """``solver.solve(state, G, damping)`` under the config's escalation policy
    (`InfluenceConfig.escalate_damping`): a damping raised is warned (`DampingWarning`), never
    silent, and a solve that still needs more damping where none may be added is refused with
    the most negative curvature found and the fix. Returns (result, damping used, escalations)."""
    auto = isinstance(config.damping, str)
    allowed = config.escalate_damping if config.escalate_damping is not None else auto
    res, used, escalations = linsolve.solve_escalating(
        lambda d: solver.solve(state, G, d), damping, escalate=allowed, tries=ESCALATION_TRIES
    )
    if escalations:
        why = sorted({e["reason"] for e in escalations})
        warnings.warn(
            DampingWarning(
                f"influence: damping raised from {damping:.3g} to {used:.3g} ({', '.join(why)}); P "
                f"answers for the curvature + {used:.3g}·I. To keep a damping, set it above the "
                "most negative curvature, or use curvature='gauss_newton' (positive "
                "semi-definite)"
            ),
            stacklevel=3,
        )
    if linsolve.needs_more_damping(res):
        _refuse_damping(state, used, res, allowed, auto)
    return res, used, escalations


def _refuse_damping(state: State, damping: float, res, allowed: bool, auto: bool):
    negative = bool(np.any(np.asarray(res.negative_curvature)))
    setting = "the automatic damping" if auto else f"damping={damping:.3g}"
    if negative:
        op = state.operator
        theta = op.data.theta
        lam = linsolve.smallest_eigenvalue(
            lambda v: op.matvec(v[None])[0] + damping * v, theta.size, theta.dtype
        )
        got = (
            f"negative curvature at {setting}: the damped curvature has an eigenvalue of "
            f"about {lam:.3g} (Lanczos estimate, an upper bound on the most negative one)"
        )
        need = damping - min(lam, 0.0)  # the damping at which that eigenvalue reaches 0
        fix = (
            f"set damping above {need:.3g} (e.g. {2 * need:.3g})"
            if lam < 0
            else "raise the damping (×10), or use solver='cg'"
        )  # (LiSSA's divergence: no negative λ)
    else:
        got = f"a non-finite solution at {setting} (an empty direction of the factored curvature)"
        fix = "set a damping > 0"
    how = (
        f"escalation (×10, {ESCALATION_TRIES - 1} times) did not reach a positive definite system"
        if allowed
        else "the damping is yours, so it is not replaced silently"
    )
    raise checks.NumericalError(
        f"influence: curvature solve: {got}; {how}. Fix: {fix}, use curvature='gauss_newton' "
        "(positive semi-definite; needs the logits: apply=, model= or a models.OutputLoss)"
        + (
            ""
            if allowed
            else ", or pass escalate_damping=True to let the library raise it (warned)"
        )
    )
