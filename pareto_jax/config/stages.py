"""The records of the numerical stages: training, influence, the program, the search."""

from __future__ import annotations

import dataclasses

from .. import checks
from .vocabulary import (
    CURVATURES,
    EXECUTIONS,
    FISHERS,
    NO_DAMPING,
    NORMALIZERS,
    OPTIMIZERS,
    PRECONDITIONERS,
    PRODUCT_INFLUENCE,
    PROGRAM_SOLVERS,
    RETRAIN,
    ROW_METHODS,
    SOLVERS,
    weight_bounds,
)

# ----------------------------------------------------------------------------- training


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train (the model and data are passed separately).

    The training objective these settings define (with the loss) is `pareto_jax.train.Objective`,
    the one record of it that influence, evaluation and retraining all take.

    Attributes:
        epochs: passes over the training set.
        batch_size: minibatch size; None (or >= N) means full batch.
        optimizer: "adam", "sgd" (with `momentum`) or "gd" (plain full-step gradient descent).
        learning_rate: step size.
        weight_decay: λ of the L2 term (λ/2)‖θ‖² inside the loss (not decoupled), so the
            influence functions see the same objective.
        momentum: for "sgd".
        normalizer: "weights" (Σ w ℓ / Σ w) or "n" (Σ w ℓ / N).
        seed: shuffling seed; epoch e uses fold_in(seed, e), so continuing from a checkpoint
            replays the same batch order as uninterrupted training.
        checkpoint_epochs: epochs after which to save params and optimizer state.

    Example:
        >>> from pareto_jax import TrainConfig
        >>> TrainConfig(epochs=5, optimizer="sgd").learning_rate
        0.01
    """

    epochs: int = 40
    batch_size: int | None = 128
    optimizer: str = "adam"
    learning_rate: float = 1e-2
    weight_decay: float = 1e-3
    momentum: float = 0.9
    normalizer: str = "weights"
    seed: int = 0
    checkpoint_epochs: tuple[int, ...] = ()

    def __post_init__(self):
        checks.check_positive(self.epochs, "epochs", integer=True, allow_zero=True)
        if self.batch_size is not None:
            checks.check_positive(self.batch_size, "batch_size", integer=True)
        checks.check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        checks.check_positive(self.learning_rate, "learning_rate")
        checks.check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        checks.check_in_range(self.momentum, "momentum", 0.0, 0.999)
        checks.check_choice(self.normalizer, "normalizer", NORMALIZERS)
        checks.check_seed(self.seed, "seed")
        object.__setattr__(self, "checkpoint_epochs", tuple(int(e) for e in self.checkpoint_epochs))


# ----------------------------------------------------------------------------- influence


@dataclasses.dataclass(frozen=True)
class InfluenceConfig:
    """Numerical choices for `category_influence` (the problem itself is passed separately).

    Attributes:
        solver: "cg" (default), "dense" (exact reference; small models), "lissa" (see
            `linsolve.solve_lissa`), "kfac" or "ekfac" (see `pareto_jax.kfac`; they need
            `model=`). Each name is a solver object of `pareto_jax.influence.solvers` built from
            this config; all go through the same damping rule and escalation.
        preconditioner: "none" (default), "kfac" or "ekfac": CG preconditioned by the K-FAC /
            EK-FAC factors of the model (needs `model=`). The stopping rule stays on the true
            residual of the chosen curvature, so the answer is CG's, only faster.
        curvature: "auto" (default: "gauss_newton" when `apply` is given and `loss_fn` is the
            softmax cross-entropy of its logits, checked on 16 training samples; else
            "hessian", with a note in `details`), "hessian" or "gauss_newton" (PSD; needs
            `apply` and a cross-entropy loss, or a `models.OutputLoss`, whose own output Hessian it
            uses; so do K-FAC/EK-FAC). Why Gauss-Newton CG is the default, and when K-FAC/EK-FAC
            are the better choice (deeper CNNs): ``docs/method.md``, "Choosing an estimator".
        damping: δ >= 0 added to the curvature of the training objective (which already holds
            the weight decay λ), for every solver; or "auto" = 1e-4 · tr(H + λI)/P, a small
            fraction of the mean curvature eigenvalue (Hutchinson estimate, 8 probes; for
            solver "kfac" / "ekfac" read off the factors with no probes: exactly, or with
            `fisher="sampled"` as noisy as the sampled factors).
        escalate_damping: what to do when a solve meets negative curvature (CG, dense),
            diverges (LiSSA) or returns non-finite values (K-FAC with an empty direction): True
            retries with damping ×10 (up to 11 times, from at least 1e-6) with a
            `DampingWarning`; False refuses
            (`NumericalError` with the most negative curvature found and the fix); None (default)
            escalates the "auto" damping (warned) and refuses to replace a damping you chose.
            Every escalation is in the result's `escalations`.
        rtol, atol, max_steps: the iterative solvers' stopping rule per class (CG's residual;
            LiSSA's relative update, with `max_steps` its number of draws). rtol "auto"
            (default): 1e-6, or 1000 machine epsilons of the parameters' dtype where that is
            larger (float32: 1.2e-4), a tolerance the dtype reaches, so `converged` means it.
        method: "auto", "jvp" or "per_sample" for the P stage.
        chunk_size: training samples per chunk in the P stage.
        hvp_batch_size: samples per minibatch inside each HVP (and per batch of the K-FAC
            factor passes).
        throw: raise `NumericalError` if a solve does not converge (else report it).
        seed: for the "auto" damping's probes and LiSSA's minibatch draws.
        execution: "auto" (default), "compiled" or "stepped": whether the loops over chunks and
            CG iterations run inside one XLA program or from the host over jitted chunk
            programs; "auto" steps on CPU (`kernels.loops_on_host`), the same numbers either
            way (to float rounding). Reported in `InfluenceResult.details`.
        fisher: K-FAC / EK-FAC's output side: "expected" (default: the exact expectation over
            the K classes of the output Hessian, K backward passes per batch) or "sampled" (one
            label per sample drawn from the model's softmax with `seed`, one backward pass per
            batch: unbiased for the same matrix, noisier, about K times fewer backward passes;
            Kronfluence's default). Softmax cross-entropy only.
        report_residual: for K-FAC / EK-FAC, also measure their solution's residual against the
            chosen curvature (one more curvature product for all K right-hand sides; about as
            long as the factor pass on a CNN). Off by default; either way `converged` is False
            for them, since they solve an approximation of the curvature, not the system itself.

    Example:
        >>> from pareto_jax import InfluenceConfig
        >>> InfluenceConfig(solver="ekfac").uses_factors, InfluenceConfig.exact().damping
        (True, 0.0)
    """

    solver: str = "cg"
    preconditioner: str = "none"
    curvature: str = "auto"
    damping: float | str = "auto"
    escalate_damping: bool | None = None
    rtol: float | str = "auto"
    atol: float = 0.0
    max_steps: int = 1000
    method: str = "auto"
    chunk_size: int = 256
    hvp_batch_size: int = 1024
    throw: bool = False
    seed: int = 0
    execution: str = "auto"
    fisher: str = "expected"
    report_residual: bool = False

    def __post_init__(self):
        checks.check_choice(self.solver, "solver", SOLVERS)
        checks.check_choice(self.preconditioner, "preconditioner", PRECONDITIONERS)
        if self.preconditioner != "none" and self.solver != "cg":
            checks.fail("preconditioner", repr(self.preconditioner), "'none' unless solver='cg'",
                "use solver='cg' with a preconditioner, or preconditioner='none'")
        checks.check_choice(self.curvature, "curvature", CURVATURES)
        if self.damping != "auto":
            checks.check_positive(self.damping, "damping", allow_zero=True)
        if self.rtol != "auto":
            checks.check_positive(self.rtol, "rtol")
        if self.escalate_damping not in (None, True, False):
            checks.fail("escalate_damping", repr(self.escalate_damping), "None, True or False",
                "pass True (raise it, warned), False (refuse) or None (raise only 'auto')")
        checks.check_positive(self.atol, "atol", allow_zero=True)
        checks.check_positive(self.max_steps, "max_steps", integer=True)
        checks.check_choice(self.method, "method", ROW_METHODS)
        checks.check_positive(self.chunk_size, "chunk_size", integer=True)
        checks.check_positive(self.hvp_batch_size, "hvp_batch_size", integer=True)
        checks.check_seed(self.seed, "seed")
        checks.check_choice(self.execution, "execution", EXECUTIONS)
        checks.check_choice(self.fisher, "fisher", FISHERS)
        if self.fisher != FISHERS[0] and not self.uses_factors:
            checks.fail("fisher", repr(self.fisher), f"{FISHERS[0]!r} unless K-FAC / EK-FAC "
                "factors are used", "pass solver='kfac' / 'ekfac' (or a K-FAC preconditioner)")

    @property
    def factored(self) -> bool:
        """Whether the solver is K-FAC / EK-FAC itself."""
        return self.solver in ("kfac", "ekfac")

    @property
    def uses_factors(self) -> bool:
        """Whether this config needs K-FAC / EK-FAC factors (as the solver or the "
        "preconditioner)."""
        return self.factored or self.preconditioner != "none"

    @classmethod
    def exact(cls, **kw) -> "InfluenceConfig":
        """Dense Hessian solve, no damping (small models; the reference)."""
        return cls(solver="dense", damping=NO_DAMPING, **kw)

    @classmethod
    def for_product(cls, name: str | None = None, **kw) -> "InfluenceConfig":
        """The influence the product's jobs use for a deep model (`pareto-jax run --influence`):
        "ekfac" (the default: Gauss-Newton factored per layer with its eigenvalues corrected,
        then inverted exactly; seconds on the CNNs, and as predictive of retraining as CG in
        `bench_lds`), "kfac", or "cg" (Gauss-Newton CG to the tolerance: the exact solve, minutes
        on a CNN). All take the "auto" damping."""
        name = name or PRODUCT_INFLUENCE[0]  # (None: the default, "ekfac")
        checks.check_choice(name, "influence", PRODUCT_INFLUENCE)
        if name == "cg":
            return cls(curvature="gauss_newton", **kw)
        return cls(solver=name, curvature="gauss_newton", **kw)

    @classmethod
    def fast(cls, **kw) -> "InfluenceConfig":
        """Gauss-Newton CG with a loose tolerance (large models, exploratory use)."""
        return cls(curvature="gauss_newton", rtol=1e-4, max_steps=200, **kw)


# ----------------------------------------------------------------------------- the program


@dataclasses.dataclass(frozen=True)
class ReweightConfig:
    """Options of the reweighting program (the problem data P, targets, α come separately).

    Attributes:
        w_max: upper bound on every weight (below 1, w = 1 is outside the box: every weight
            must move down).
        rho: trust region |w_i − 1| <= ρ (None: off).
        budget: L1 budget Σ_i |w_i − 1| <= B (None: off).
        mu: proximal term (μ/2)‖w − 1‖² in units of P (0: the LP). Smooth, interior weights.
        solver: "device" (pure JAX on the device: the structured dual stage and the exact
            finish) or "highs" (the host reference: scipy's HiGHS for the LP, highspy for the QP).
        rtol: relative tolerance of the dual stage's last continuation stage (the LP's answer is
            then made exact by the finish; the QP's is certified by its duality gap).
        feas_tol: allowed constraint violation after the float64 re-check (absolute, in units of
            P); above it the status is 4 (numerical).

    Example:
        >>> from pareto_jax import ReweightConfig
        >>> ReweightConfig(rho=0.3).bounds, ReweightConfig.downweight_only().w_max
        ((0.7, 1.3), 1.0)
    """

    w_max: float = 2.0
    rho: float | None = None
    budget: float | None = None
    mu: float = 0.0
    solver: str = "device"
    rtol: float = 1e-9
    feas_tol: float = 1e-9

    def __post_init__(self):
        checks.check_positive(self.w_max, "w_max")
        if self.rho is not None:
            checks.check_positive(self.rho, "rho")
        if self.budget is not None:
            checks.check_positive(self.budget, "budget")
        checks.check_positive(self.mu, "mu", allow_zero=True)
        if self.solver == "dual":  # (the name before 0.2.0)
            checks.fail("solver", "'dual'", f"one of {list(PROGRAM_SOLVERS)}",
                "'dual' was renamed 'device' in 0.2.0 (the same solver): write solver='device'")
        checks.check_choice(self.solver, "solver", PROGRAM_SOLVERS)
        checks.check_positive(self.rtol, "rtol")
        checks.check_positive(self.feas_tol, "feas_tol")

    @property
    def bounds(self) -> tuple[float, float]:
        """(lo, hi) of every weight (`weight_bounds`)."""
        return weight_bounds(float(self.w_max), self.rho)

    @classmethod
    def downweight_only(cls, **kw) -> "ReweightConfig":
        """w_max = 1: weights only move down (the improvement study's setting)."""
        return cls(w_max=1.0, **kw)


# ----------------------------------------------------------------------------- the search


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baselines (`evaluation.baseline_weights`).

    Attributes:
        fixed_alpha: α of the "program with fixed α" baseline.
        topk_fraction: fraction of samples up-weighted by the top-k baseline.
        topk_weight: the weight they get (its own setting: with a program's w_max = 1, top-k
            up-weighting would otherwise change nothing).

    The fixed-α program runs with the search's `ReweightConfig` (passed beside this record).
    """

    fixed_alpha: float = 0.9
    topk_fraction: float = 0.1
    topk_weight: float = 2.0

    def __post_init__(self):
        checks.check_in_range(self.fixed_alpha, "fixed_alpha", 0.0, 1.0)
        checks.check_in_range(self.topk_fraction, "topk_fraction", 0.0, 1.0)
        checks.check_positive(self.topk_weight, "topk_weight")


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    """Genetic-search settings (all seeded).

    Attributes:
        population: candidates per generation.
        generations: number of generations (the first is random).
        elite: best candidates copied unchanged into the next generation.
        tournament: tournament size for parent selection.
        crossover_rate: probability that a child mixes two parents (uniform crossover).
        mutation_rate: per-gene probability of a Gaussian mutation.
        mutation_sigma: its standard deviation (α is clipped to [0, 1]).
        alpha_range: initial α drawn uniformly from this range.
        seed: generator seed.
        batched: one vmapped epoch for the whole population (False: one candidate at a time,
            for memory-limited cases; same results).
        fused: a batched generation (retrain "epoch", no mesh, the device solver) runs as one
            jitted call: the population's programs, weights, weighted epochs and validation
            counts, with no host step between them (`Evaluator.generation`). False: the
            programs and the epochs are two calls (same results).
        reweight: the program's options (bounds, trust region, μ, solver).
        baselines: the baselines reported beside the search (`evaluation.baseline_weights`);
            their fixed-α program uses `reweight`.
        search_rho: if set, (ρ_min, ρ_max): the genome gets one more gene, the trust region
            |w_i − 1| <= ρ on a log scale in this range, so the search also chooses how far
            from the trained weighting to step (an extension of the method, which searches α
            only); None searches α alone with `reweight.rho`.
        others_weight: if set, (β_min, β_max): one more gene (the last), the weight β of the
            non-target classes in the program's objective, Σ_targets Σ_i w_i P[i, t] +
            β·Σ_others Σ_i w_i P[i, k] (β = 0 is the method's objective). With β > 0 the program
            also prefers samples that are harmful to every class, the direction of trimming;
            an extension of the method, selected on validation like every other gene. None:
            the method's objective.
        retrain: how a candidate's weights are tried: "epoch" (the method: one weighted epoch
            from θ^e with the checkpoint's optimizer) or "converge" (full-batch L-BFGS on the
            fixed-N weighted objective from θ^e until the gradient is small: the setting in
            which the first-order program's guarantees hold, for convex models).
        retrain_max_iter: L-BFGS iteration cap for "converge".

    Example:
        >>> from pareto_jax import SearchConfig
        >>> SearchConfig(population=8, generations=2).reweight.w_max
        2.0
    """

    population: int = 16
    generations: int = 6
    elite: int = 2
    tournament: int = 3
    crossover_rate: float = 0.9
    mutation_rate: float = 0.25
    mutation_sigma: float = 0.15
    alpha_range: tuple[float, float] = (0.5, 1.0)
    seed: int = 0
    batched: bool = True
    fused: bool = True
    reweight: ReweightConfig = ReweightConfig()
    baselines: BaselineConfig = BaselineConfig()
    search_rho: tuple[float, float] | None = (0.05, 1.0)
    others_weight: tuple[float, float] | None = None
    retrain: str = "epoch"
    retrain_max_iter: int = 500

    def __post_init__(self):
        checks.check_positive(self.population, "population", integer=True)
        if self.population < 2:
            checks.fail("population", repr(self.population),
                "an integer >= 2 (a generation needs parents)", "e.g. population=16")
        checks.check_positive(self.generations, "generations", integer=True)
        checks.check_positive(self.elite, "elite", integer=True, allow_zero=True)
        if self.elite >= self.population:
            checks.fail("elite", repr(self.elite), f"fewer than population ({self.population})",
                "lower elite or raise population")
        checks.check_positive(self.tournament, "tournament", integer=True)
        checks.check_in_range(self.crossover_rate, "crossover_rate", 0.0, 1.0)
        checks.check_in_range(self.mutation_rate, "mutation_rate", 0.0, 1.0)
        checks.check_positive(self.mutation_sigma, "mutation_sigma", allow_zero=True)
        lo, hi = self.alpha_range
        if not (0.0 <= lo <= hi <= 1.0):
            checks.fail(
                "alpha_range", repr(self.alpha_range), "0 <= lo <= hi <= 1", "e.g. (0.5, 1.0)"
            )
        checks.check_seed(self.seed, "seed")
        checks.check_choice(self.retrain, "retrain", RETRAIN)
        checks.check_positive(self.retrain_max_iter, "retrain_max_iter", integer=True)
        if self.search_rho is not None:
            a, b = self.search_rho
            if not (0 < a <= b):
                checks.fail(
                    "search_rho", repr(self.search_rho), "0 < ρ_min <= ρ_max", "e.g. (0.05, 1.0)"
                )
        if self.others_weight is not None:
            a, b = self.others_weight
            if not (0 <= a <= b):
                checks.fail("others_weight", repr(self.others_weight), "0 <= β_min <= β_max",
                    "e.g. (0.0, 1.0)")


@dataclasses.dataclass(frozen=True)
class RoundsConfig:
    """The program that re-linearises (`pareto_jax.rounds`): sequential trust-region rounds, each
    linearised exactly at the current weights by the unrolled estimator.

    Attributes:
        rounds: at most this many accepted steps.
        rho: the first round's trust region: each weight may move by the factor u_i ∈ [1 − ρ,
            1 + ρ] (and u_i <= `reweight.w_max`: with w_max = 1 weights only go down).
        shrink: after a step that is not accepted, ρ ← shrink · ρ.
        min_rho: stop when ρ falls below this (no progress).
        alpha: each round's program keeps this share of every class's total predicted influence
            (the program's α, for every class).
        reweight: the program's options for each round's step (its `w_max` bounds the factor u).
    """

    rounds: int = 6
    rho: float = 0.3
    shrink: float = 0.5
    min_rho: float = 0.02
    alpha: float = 0.97
    reweight: ReweightConfig = ReweightConfig.downweight_only()

    def __post_init__(self):
        checks.check_positive(self.rounds, "rounds", integer=True)
        checks.check_positive(self.rho, "rho")
        checks.check_in_range(self.shrink, "shrink", 0.01, 0.99)
        checks.check_positive(self.min_rho, "min_rho")
        checks.check_in_range(self.alpha, "alpha", 0.0, 1.0)
