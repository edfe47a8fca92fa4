"""PARETO-LP-GA: the genetic search over thresholds α around the reweighting program (DESIGN §6),
its baselines, and the first-order Pareto frontier.

For a checkpoint θ^e and target classes, each candidate α gives weights w (the program of
`pareto.solve_reweighting`), one weighted epoch from θ^e, and per-class relative accuracy
changes Δ_k = 100·(Acc_k(new) − Acc_k(ref)) / Acc_k(ref) on the validation split. Fitness is
−∞ if a target class does not improve, else the mean over non-target classes of min(Δ_k, 0)
(0 when no class gets worse); ties are broken by the mean target gain. A whole generation is one
batched program solve and one `vmap`-ed epoch over the population's weights.

Modes: Direct Improvement (reference θ^e) and Course Correction (reference: the ordinary epoch
e+1; targets: the classes that dropped from e to e+1). The test split is only reported, never
used for selection.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pathlib import Path

from . import _checks, io, pareto, train

NEG_INF = float("-inf")


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
        reweight: the program's options (bounds, trust region, μ, solver).
        fixed_alpha: α of the "program with fixed α" baseline.
        topk_fraction: fraction of samples up-weighted by the top-k baseline.
        topk_weight: the weight they get (its own setting: with the program's w_max = 1, top-k
            up-weighting would otherwise change nothing).
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
    reweight: pareto.ReweightConfig = pareto.ReweightConfig(w_max=2.0)
    fixed_alpha: float = 0.9
    topk_fraction: float = 0.1
    topk_weight: float = 2.0
    search_rho: tuple[float, float] | None = (0.05, 1.0)
    others_weight: tuple[float, float] | None = None
    retrain: str = "epoch"
    retrain_max_iter: int = 500

    def __post_init__(self):
        _checks.check_positive(self.population, "population", integer=True)
        _checks.check_positive(self.generations, "generations", integer=True)
        _checks.check_positive(self.elite, "elite", integer=True, allow_zero=True)
        if self.elite >= self.population:
            _checks.fail("elite", repr(self.elite), f"fewer than population ({self.population})",
                         "lower elite or raise population")
        _checks.check_positive(self.tournament, "tournament", integer=True)
        _checks.check_in_range(self.crossover_rate, "crossover_rate", 0.0, 1.0)
        _checks.check_in_range(self.mutation_rate, "mutation_rate", 0.0, 1.0)
        _checks.check_positive(self.mutation_sigma, "mutation_sigma", allow_zero=True)
        lo, hi = self.alpha_range
        if not (0.0 <= lo <= hi <= 1.0):
            _checks.fail("alpha_range", repr(self.alpha_range), "0 <= lo <= hi <= 1", "e.g. (0.5, 1.0)")
        _checks.check_in_range(self.fixed_alpha, "fixed_alpha", 0.0, 1.0)
        _checks.check_in_range(self.topk_fraction, "topk_fraction", 0.0, 1.0)
        _checks.check_positive(self.topk_weight, "topk_weight")
        _checks.check_choice(self.retrain, "retrain", ("epoch", "converge"))
        _checks.check_positive(self.retrain_max_iter, "retrain_max_iter", integer=True)
        if self.search_rho is not None:
            a, b = self.search_rho
            if not (0 < a <= b):
                _checks.fail("search_rho", repr(self.search_rho), "0 < ρ_min <= ρ_max", "e.g. (0.05, 1.0)")
        if self.others_weight is not None:
            a, b = self.others_weight
            if not (0 <= a <= b):
                _checks.fail("others_weight", repr(self.others_weight), "0 <= β_min <= β_max", "e.g. (0.0, 1.0)")

    @property
    def n_genes(self) -> int:
        return (self.search_rho is not None) + (self.others_weight is not None)

    def beta_of(self, gene: float) -> float:
        a, b = self.others_weight
        return float(a + gene * (b - a))

    def program_of(self, genome, targets, K: int):
        """(α, ReweightConfig, class weights or None) of a genome."""
        g = np.asarray(genome, np.float64)
        cfg = self.reweight
        if self.search_rho is not None:
            cfg = dataclasses.replace(cfg, rho=self.rho_of(g[K]))
        beta = None
        if self.others_weight is not None:
            beta = np.full(K, self.beta_of(g[-1]))
            beta[list(targets)] = 1.0
        return g[:K], cfg, beta

    def rho_of(self, gene: float) -> float:
        a, b = self.search_rho
        return float(np.exp(np.log(a) + gene * (np.log(b) - np.log(a))))


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
            x = _checks.as_features(getattr(self, f"x_{n}"), f"x_{n}")
            y = _checks.as_labels(getattr(self, f"y_{n}"), f"y_{n}", num_classes=self.num_classes,
                                  n=x.shape[0], x_name=f"x_{n}")
            object.__setattr__(self, f"x_{n}", x)
            object.__setattr__(self, f"y_{n}", y)
        _checks.check_all_classes_present(self.y_val, self.num_classes, "y_val")
        if self.base_weights is not None:
            object.__setattr__(self, "base_weights",
                               _checks.as_weights(self.base_weights, self.x_train.shape[0], "base_weights"))


# ----------------------------------------------------------------------------- batched evaluation


@functools.lru_cache(maxsize=16)
def _acc_fn(apply, K):
    """Per-class accuracy; counts are summed as integers and divided in float64 on the host, so
    batched and sequential evaluations agree bit for bit."""
    def hits(params, x, y):
        correct = (jnp.argmax(apply(params, x), -1) == y)
        return jnp.sum(jax.nn.one_hot(y, K, dtype=jnp.int32) * correct[:, None].astype(jnp.int32), 0)

    one, many = jax.jit(hits), jax.jit(jax.vmap(hits, in_axes=(0, None, None)))

    def acc(params, x, y):
        counts = np.maximum(np.bincount(np.asarray(y), minlength=K), 1)
        return np.asarray(one(params, x, y), np.float64) / counts

    def acc_batch(params, x, y):
        counts = np.maximum(np.bincount(np.asarray(y), minlength=K), 1)
        return np.asarray(many(params, x, y), np.float64) / counts

    return acc, acc_batch


class _Evaluator:
    """Jitted one-epoch training and per-class accuracy, single and batched over weights."""

    def __init__(self, problem: SearchProblem, retrain: str = "epoch", max_iter: int = 500,
                 mesh=None):
        self.p = problem
        self.mesh = mesh
        self.retrain = retrain
        self.epoch = train.make_epoch_fn(problem.loss_fn, problem.train_config, problem.x_train.shape[0])
        self.epoch_batch = jax.jit(jax.vmap(self.epoch, in_axes=(None, None, None, None, 0, None)))
        fit = train._lbfgs_fit_fn(problem.loss_fn, float(problem.train_config.weight_decay), "n",
                                  int(max_iter), 1e-6)
        self.fit = fit
        # L-BFGS iteration counts differ across members: lock-step vmap pays for the slowest,
        # so on CPU the population is looped inside one compiled program instead
        if jax.default_backend() == "cpu" and mesh is None:
            self.fit_batch = jax.jit(lambda p, x, y, W: jax.lax.map(lambda w: fit(p, x, y, w), W))
        else:
            self.fit_batch = jax.jit(jax.vmap(fit, in_axes=(None, None, None, 0)))
        self.acc, self.acc_batch = _acc_fn(problem.apply, problem.num_classes)
        dt = jnp.result_type(*jax.tree_util.tree_leaves(problem.state.params))
        self.dt = dt
        self.x = jnp.asarray(problem.x_train, dt)
        self.y = jnp.asarray(problem.y_train)
        self.xv, self.yv = jnp.asarray(problem.x_val, dt), jnp.asarray(problem.y_val)
        self.xt, self.yt = jnp.asarray(problem.x_test, dt), jnp.asarray(problem.y_test)

    def _scaled(self, W):
        W = np.asarray(W, np.float64)
        return W if self.p.base_weights is None else W * self.p.base_weights

    def train_one(self, w):
        return self._train(self._scaled(w))

    def _train(self, w):
        s = self.p.state
        if self.retrain == "converge":
            p, _, _ = self.fit(s.params, self.x, self.y, jnp.asarray(w, self.dt))
            return p, s.opt_state
        p, o, _ = self.epoch(s.params, s.opt_state, self.x, self.y, jnp.asarray(w, self.dt), s.epoch)
        return p, o

    def train_many(self, W, batched: bool):
        W = self._scaled(W)
        s = self.p.state
        if batched and self.mesh is not None:
            # the population axis sharded over the mesh; everything else replicated
            from . import distributed

            Wd, npop = distributed.shard_population(self.mesh, np.asarray(W, self.dt))
            params, opt_state, x, y = distributed.replicate(self.mesh, (s.params, s.opt_state, self.x, self.y))
            if self.retrain == "converge":
                p, _, _ = self.fit_batch(params, x, y, Wd)
                o = None
            else:
                p, o, _ = self.epoch_batch(params, opt_state, x, y, Wd, s.epoch)
            cut = lambda t: None if t is None else jax.tree_util.tree_map(lambda a: a[:npop], t)  # noqa: E731
            return cut(p), cut(o)
        if batched and self.retrain == "converge":
            p, _, _ = self.fit_batch(s.params, self.x, self.y, jnp.asarray(W, self.dt))
            return p, None
        if batched:
            p, o, _ = self.epoch_batch(s.params, s.opt_state, self.x, self.y, jnp.asarray(W, self.dt), s.epoch)
            return p, o
        outs = [self._train(w) for w in W]
        return jax.tree_util.tree_map(lambda *a: jnp.stack(a), *[o[0] for o in outs]), None

    def accuracies(self, params_batch, split: str = "val", batched: bool = True) -> np.ndarray:
        x, y = (self.xv, self.yv) if split == "val" else (self.xt, self.yt)
        if batched:
            return np.asarray(self.acc_batch(params_batch, x, y), np.float64)
        n = jax.tree_util.tree_leaves(params_batch)[0].shape[0]
        return np.stack([np.asarray(self.acc(jax.tree_util.tree_map(lambda a: a[i], params_batch), x, y),
                                    np.float64) for i in range(n)])


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
    return (float(np.mean(np.minimum(others, 0.0))) if others.size else 0.0), float(np.mean(delta[t]))


# ----------------------------------------------------------------------------- the search


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One evaluated genome: α (K thresholds) and, when searched, the trust region ρ."""

    genome: np.ndarray
    alpha: np.ndarray
    rho: float | None
    fitness: float
    tiebreak: float
    delta_val: np.ndarray
    status: int


@dataclasses.dataclass(frozen=True, eq=False)
class SearchResult:
    """Outcome of `run_search`.

    Attributes:
        mode, targets: what was searched for.
        best: the best `Candidate` (α, fitness, validation Δ).
        weights: its weights w; program: its `ReweightResult` summary.
        params: the model after its weighted epoch.
        ref_val, ref_test: reference per-class accuracies (θ^e, or epoch e+1 in Course Correction).
        val_acc, test_acc: the best candidate's per-class accuracies; delta_val, delta_test: Δ_k.
        history: per generation: best / mean finite fitness, feasible count, seconds.
        evaluations: every distinct candidate evaluated (α, fitness, Δ).
        found: False when no candidate improved every target.
    """

    mode: str
    targets: tuple[int, ...]
    best: Candidate
    weights: np.ndarray | None
    program: dict
    params: Any
    ref_val: np.ndarray
    ref_test: np.ndarray
    val_acc: np.ndarray
    test_acc: np.ndarray
    delta_val: np.ndarray
    delta_test: np.ndarray
    history: tuple[dict, ...]
    evaluations: tuple[Candidate, ...]
    found: bool


class _Population:
    """Evaluates α vectors (program → one weighted epoch → Δ → fitness), with a cache."""

    def __init__(self, ev: _Evaluator, P, targets, ref_val, config: SearchConfig):
        self.ev, self.P, self.targets, self.ref_val, self.cfg = ev, P, tuple(targets), ref_val, config
        self.cache: dict[bytes, Candidate] = {}
        self.solutions: dict[bytes, pareto.ReweightResult] = {}

    def solve(self, genomes: np.ndarray) -> list[pareto.ReweightResult]:
        """The programs of these genomes: one batched solve, or one at a time."""
        K = self.P.shape[1]
        progs = [self.cfg.program_of(g, self.targets, K) for g in genomes]
        if self.cfg.batched:
            A = np.stack([p[0] for p in progs])
            rhos = None if self.cfg.search_rho is None else np.array([p[1].rho for p in progs])
            betas = None if self.cfg.others_weight is None else np.stack([p[2] for p in progs])
            return pareto.solve_reweighting_batch(self.P, self.targets, A, self.cfg.reweight, rhos=rhos,
                                                  class_weights=betas)
        # one candidate at a time (memory-limited path): same programs, same answers
        return [pareto.solve_reweighting(self.P, self.targets, a, c, class_weights=b) for a, c, b in progs]

    def evaluate(self, alphas: np.ndarray) -> list[Candidate]:
        keys = [np.asarray(a, np.float64).tobytes() for a in alphas]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        todo = list(dict.fromkeys(todo))
        uniq = {}
        for i in todo:
            uniq.setdefault(keys[i], i)
        idx = list(uniq.values())
        if idx:
            K = self.P.shape[1]
            sols = self.solve(np.stack([alphas[i] for i in idx]))
            W = np.stack([s.w if s.w is not None else np.ones(self.P.shape[0]) for s in sols])
            params, _ = self.ev.train_many(W, self.cfg.batched)
            acc = self.ev.accuracies(params, "val", self.cfg.batched)
            for j, i in enumerate(idx):
                d = relative_change(acc[j], self.ref_val)
                f, tb = fitness(d, self.targets) if sols[j].w is not None else (NEG_INF, NEG_INF)
                g = np.asarray(alphas[i], np.float64)
                a, rcfg, _ = self.cfg.program_of(g, self.targets, K)
                self.cache[keys[i]] = Candidate(g, a, rcfg.rho, f, tb, d, sols[j].status)
                self.solutions[keys[i]] = sols[j]
        return [self.cache[k] for k in keys]


def _rank_key(c: Candidate):
    return (c.fitness, c.tiebreak if np.isfinite(c.tiebreak) else NEG_INF)


def _cand_to_json(c: Candidate) -> dict:
    return {"genome": c.genome.tolist(), "rho": c.rho, "fitness": repr(c.fitness),
            "tiebreak": repr(c.tiebreak), "delta_val": c.delta_val.tolist(), "status": c.status}


def _cand_from_json(d: dict, K: int) -> Candidate:
    g = np.asarray(d["genome"], np.float64)
    return Candidate(g, g[:K], d["rho"], float(d["fitness"]), float(d["tiebreak"]),
                     np.asarray(d["delta_val"], np.float64), int(d["status"]))


def run_search(problem: SearchProblem, P, targets: Sequence[int], *, mode: str = "direct",
               ref_params=None, config: SearchConfig = SearchConfig(),
               progress: bool = False, on_generation: Callable[[int, dict], None] | None = None,
               checkpoint: str | None = None, mesh=None) -> SearchResult:
    """PARETO-LP-GA on a checkpoint (see the module docstring).

    Args:
        problem: the checkpoint and data (`SearchProblem`).
        P: influence matrix at θ^e (N, K), computed on the validation split.
        targets: classes to improve.
        mode: "direct" (reference θ^e) or "course_correction" (reference `ref_params`, the
            ordinary epoch e+1).
        ref_params: the reference model for Course Correction.
        config: `SearchConfig`.
        progress: show a progress bar over generations.
        on_generation: callback(generation, state dict) after each finished generation.
        checkpoint: a JSON file. After every generation the search state (next population,
            generator state, history, every evaluated candidate) is written there atomically;
            if the file exists when the search starts, it resumes from it, and the final
            result is the same as an uninterrupted run's. The caller keys the file to the
            problem and config (`pipeline` does, by fingerprint).
        mesh: a `distributed.make_mesh` mesh: the batched population's retraining is sharded
            over its devices (population axis). None: one device.

    Returns:
        `SearchResult`. If no candidate improves every target, `found` is False and the best
        candidate by tie-break is reported (never silently presented as an improvement).
    """
    from tqdm.auto import tqdm

    _checks.check_choice(mode, "mode", ("direct", "course_correction"))
    K = problem.num_classes
    P = _checks.as_influence_matrix(P, "P")
    if P.shape != (problem.x_train.shape[0], K):
        _checks.fail("P", f"shape {P.shape}", f"({problem.x_train.shape[0]}, {K})",
                     "compute P on this problem's training set")
    targets = _checks.as_class_indices(targets, K)
    ev = _Evaluator(problem, config.retrain, config.retrain_max_iter, mesh)
    if mode == "direct":
        ref = problem.state.params
    else:
        if ref_params is None:
            _checks.fail("ref_params", "None", "the ordinary epoch e+1 params", "pass ref_params")
        ref = ref_params
    ref_val = np.asarray(ev.acc(ref, ev.xv, ev.yv), np.float64)
    ref_test = np.asarray(ev.acc(ref, ev.xt, ev.yt), np.float64)
    pop = _Population(ev, P, targets, ref_val, config)
    rng = np.random.default_rng(config.seed)
    lo, hi = config.alpha_range
    genes = K + config.n_genes
    alphas = rng.uniform(lo, hi, (config.population, genes))
    if config.search_rho is not None:
        alphas[:, K] = rng.uniform(0.0, 1.0, config.population)
    if config.others_weight is not None:
        alphas[:, -1] = rng.uniform(0.0, 1.0, config.population)
    history: list[dict] = []
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        st = io.read_json(checkpoint)
        start = int(st["next_generation"])
        alphas = np.asarray(st["population"], np.float64)
        rng.bit_generator.state = st["rng_state"]
        history = st["history"]
        for d in st["candidates"]:
            c = _cand_from_json(d, K)
            pop.cache[c.genome.tobytes()] = c
    for g in tqdm(range(start, config.generations), initial=start, total=config.generations,
                  disable=not progress, desc="search", unit="gen"):
        t0 = time.perf_counter()
        cands = pop.evaluate(alphas)
        fin = [c.fitness for c in cands if np.isfinite(c.fitness)]
        best = max(cands, key=_rank_key)
        history.append({"generation": g, "best_fitness": best.fitness,
                        "best_target_gain": best.tiebreak,
                        "mean_finite_fitness": float(np.mean(fin)) if fin else NEG_INF,
                        "n_finite": len(fin), "n_infeasible": sum(c.status != 0 for c in cands),
                        "seconds": time.perf_counter() - t0})
        if g == config.generations - 1:
            continue  # (not break: the progress bar then shows the last generation as done)
        alphas = _next_generation(alphas, cands, rng, config)
        state = {"next_generation": g + 1, "population": alphas.tolist(),
                 "rng_state": rng.bit_generator.state, "history": history,
                 "candidates": [_cand_to_json(c) for c in pop.cache.values()]}
        if checkpoint is not None:
            io.write_json(checkpoint, state)
        if on_generation is not None:
            on_generation(g, state)
    everything = sorted(pop.cache.values(), key=_rank_key, reverse=True)
    best = everything[0]
    # the winner's program is solved once more on its own, so a resumed search (whose early
    # candidates were evaluated by another process) returns exactly the same weights
    a, rcfg, beta = config.program_of(best.genome, targets, K)
    sol = pareto.solve_reweighting(P, targets, a, rcfg, class_weights=beta)
    w = sol.w
    params, _ = ev.train_one(w if w is not None else np.ones(P.shape[0]))
    val_acc = np.asarray(ev.acc(params, ev.xv, ev.yv), np.float64)
    test_acc = np.asarray(ev.acc(params, ev.xt, ev.yt), np.float64)
    return SearchResult(mode, targets, best, w, sol.summary(), params, ref_val, ref_test, val_acc,
                        test_acc, relative_change(val_acc, ref_val), relative_change(test_acc, ref_test),
                        tuple(history), tuple(everything), bool(np.isfinite(best.fitness)))


def _next_generation(alphas, cands, rng, config: SearchConfig) -> np.ndarray:
    M, K = alphas.shape
    order = sorted(range(M), key=lambda i: _rank_key(cands[i]), reverse=True)
    elite = [alphas[i] for i in order[: config.elite]]
    keys = [_rank_key(c) for c in cands]

    def pick():
        idx = rng.choice(M, size=min(config.tournament, M), replace=False)
        # all −∞ (no feasible improvement yet): the tie-break still orders them; ties → first
        return alphas[max(idx, key=lambda i: keys[i])]

    children = []
    while len(children) < M - len(elite):
        a, b = pick(), pick()
        child = np.where(rng.random(K) < 0.5, a, b) if rng.random() < config.crossover_rate else a.copy()
        mut = rng.random(K) < config.mutation_rate
        child = np.clip(child + mut * rng.normal(0, config.mutation_sigma, K), 0.0, 1.0)
        children.append(child)
    return np.stack(elite + children)


# ----------------------------------------------------------------------------- baselines


def baseline_weights(P, y_train, targets: Sequence[int], num_classes: int,
                     config: SearchConfig = SearchConfig()) -> dict[str, np.ndarray]:
    """The baselines of DESIGN §6 as weight vectors (each then gets one weighted epoch).

    * unweighted: w = 1 (the ordinary epoch e+1);
    * class_balanced: w_i ∝ 1/count(y_i), mean 1;
    * trim_negative: w_i = 0 where Σ_k P[i, k] < 0;
    * topk_upweight: w_i = `topk_weight` for the top `topk_fraction` of Σ_{t∈targets} P[i, t];
    * fixed_alpha_lp: the program with α = `fixed_alpha` for every class (no search).
    """
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
    sol = pareto.solve_reweighting(P, targets, config.fixed_alpha, config.reweight)
    if sol.w is not None:
        out["fixed_alpha_lp"] = sol.w
    return out


def evaluate_weightings(problem: SearchProblem, weightings: dict[str, np.ndarray], ref_params,
                        *, batched: bool = True, retrain: str = "epoch",
                        max_iter: int = 500, mesh=None) -> dict[str, dict]:
    """Retrain from θ^e per weighting (as the search does); per-class val/test accuracy and Δ."""
    ev = _Evaluator(problem, retrain, max_iter, mesh)
    names = list(weightings)
    W = np.stack([weightings[n] for n in names])
    params, _ = ev.train_many(W, batched)
    va = ev.accuracies(params, "val", batched)
    te = ev.accuracies(params, "test", batched)
    rv = np.asarray(ev.acc(ref_params, ev.xv, ev.yv), np.float64)
    rt = np.asarray(ev.acc(ref_params, ev.xt, ev.yt), np.float64)
    return {n: {"val_acc": va[i], "test_acc": te[i], "delta_val": relative_change(va[i], rv),
                "delta_test": relative_change(te[i], rt)} for i, n in enumerate(names)}


MATCH_STEPS = (1.0, 0.8, 0.65, 0.5, 0.4, 0.3, 0.22, 0.15, 0.1, 0.06, 0.03, 0.015)


def harm_matched_baselines(problem: SearchProblem, weightings: dict[str, np.ndarray], ref_params,
                           targets: Sequence[int], *, steps: Sequence[float] = MATCH_STEPS,
                           batched: bool = True, retrain: str = "epoch", max_iter: int = 500,
                           mesh=None) -> dict[str, dict]:
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
        _checks.fail("steps", repr(steps), "values in (0, 1] and at least one baseline", "keep the default")
    scaled = {(n, t): 1.0 + t * (np.asarray(weightings[n], np.float64) - 1.0) for n in names for t in steps}
    got = evaluate_weightings(problem, scaled, ref_params, batched=batched, retrain=retrain,
                              max_iter=max_iter, mesh=mesh)
    out = {}
    for n in names:
        scored = [(fitness(got[n, t]["delta_val"], targets), t) for t in steps]
        (f, _), t = max(scored, key=lambda s: (s[0][0], s[0][1] if np.isfinite(s[0][1]) else NEG_INF))
        out[n] = {"t": t, "fitness": f, **got[n, t]}
    return out


# ----------------------------------------------------------------------------- the frontier


@dataclasses.dataclass(frozen=True)
class FrontierResult:
    """First-order Pareto frontier of per-class loss decreases within a trust region.

    Attributes:
        class_weights: (M, K) the weightings β swept (one-hot rows first).
        gains: (M, K) predicted loss decrease per class, Pᵀ(w − 1), at each frontier point.
        weights: (M, N) the weights at each point.
        ceiling: (K,) the largest predicted loss decrease of each class with no class
            predicted worse (the one-hot rows): an estimated first-order ceiling per class.
        rho: the trust region used.
    """

    class_weights: np.ndarray
    gains: np.ndarray
    weights: np.ndarray
    ceiling: np.ndarray
    rho: float


def pareto_frontier(P, *, rho: float = 0.5, n_random: int = 8, seed: int = 0,
                    solver: str = "dual") -> FrontierResult:
    """Trace the first-order frontier: for weightings β (each class alone, then random
    Dirichlet mixtures) solve max Σ_k β_k Σ_i (w_i − 1) P[i, k] s.t. no class is predicted
    worse (Pᵀ(w − 1) >= 0, i.e. α = 1) and |w_i − 1| <= ρ."""
    P = _checks.as_influence_matrix(P)
    _checks.check_positive(rho, "rho")
    K = P.shape[1]
    rng = np.random.default_rng(seed)
    B = np.concatenate([np.eye(K), rng.dirichlet(np.ones(K), size=n_random)]) if n_random else np.eye(K)
    cfg = pareto.ReweightConfig(rho=rho, w_max=1.0 + rho, solver=solver)
    gains, weights = [], []
    for beta in B:
        sol = pareto.solve_reweighting(P, None, 1.0, cfg, class_weights=beta)
        if sol.w is None:
            raise _checks.NumericalError(f"frontier: program failed for β={beta.round(3).tolist()}: {sol.message}")
        gains.append(P.T @ (sol.w - 1.0))
        weights.append(sol.w)
    G = np.stack(gains)
    return FrontierResult(B, G, np.stack(weights), np.diag(G[:K]).copy(), float(rho))
