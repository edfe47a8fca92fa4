"""PARETO-LP-GA: the genetic search over thresholds α around the reweighting program
(``docs/method.md``).

For a checkpoint θ^e and target classes, each candidate α gives weights w (the program of
`pareto.solve_reweighting`), one weighted epoch from θ^e, and per-class relative accuracy
changes Δ_k = 100·(Acc_k(new) − Acc_k(ref)) / Acc_k(ref) on the validation split
(`evaluation.Evaluator`); fitness (`evaluation.fitness`) is −∞ if a target class does not
improve, else the mean over non-target classes of min(Δ_k, 0) (0 when no class gets worse); ties
are broken by the mean target gain. A whole generation is one batched program solve and one
`vmap`-ed epoch over the population's weights.

Modes: Direct Improvement (reference θ^e) and Course Correction (reference: the ordinary epoch
e+1; targets: the classes that dropped from e to e+1). The test split is only reported, never
used for selection.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import numpy as np

from . import checks, io, pareto
from .config import SearchConfig
from .evaluation import NEG_INF, Evaluator, SearchProblem, fitness, relative_change
from .results import pytree_result


class Genome:
    """What a genome of a `SearchConfig` means: α (K thresholds), then the trust-region gene if
    `search_rho` is set, then the others' weight if `others_weight` is set."""

    def __init__(self, config: SearchConfig):
        self.config = config

    @property
    def n_extra(self) -> int:
        """Genes after the K thresholds."""
        return (self.config.search_rho is not None) + (self.config.others_weight is not None)

    def beta_of(self, gene: float) -> float:
        a, b = self.config.others_weight
        return float(a + gene * (b - a))

    def rho_of(self, gene: float) -> float:
        a, b = self.config.search_rho
        return float(np.exp(np.log(a) + gene * (np.log(b) - np.log(a))))

    def program_of(self, genome, targets, K: int):
        """(α, ReweightConfig, class weights or None) of a genome."""
        g = np.asarray(genome, np.float64)
        cfg = self.config.reweight
        if self.config.search_rho is not None:
            cfg = dataclasses.replace(cfg, rho=self.rho_of(g[K]))
        beta = None
        if self.config.others_weight is not None:
            beta = np.full(K, self.beta_of(g[-1]))
            beta[list(targets)] = 1.0
        return g[:K], cfg, beta

    def batch(self, P, genomes, targets) -> pareto.ProgramBatch:
        """The programs of these genomes, prepared for the device (`pareto.prepare`)."""
        K = np.shape(P)[1]
        progs = [self.program_of(g, targets, K) for g in genomes]
        rhos = None if self.config.search_rho is None else np.array([p[1].rho for p in progs])
        betas = None if self.config.others_weight is None else np.stack([p[2] for p in progs])
        return pareto.prepare(P, targets, np.stack([p[0] for p in progs]), self.config.reweight,
            rhos=rhos, class_weights=betas)


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


@pytree_result(
    data=("weights", "params", "ref_val", "ref_test", "val_acc", "test_acc", "delta_val",
        "delta_test", "test_correct")
)
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
        test_correct: which test samples the best candidate's model gets right (bool, (n_test,)).
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
    test_correct: np.ndarray | None = None


class Population:
    """Evaluates α vectors (program → one weighted epoch → Δ → fitness), with a cache."""

    def __init__(self, ev: Evaluator, P, targets, ref_val, config: SearchConfig):
        self.ev, self.P, self.targets, self.ref_val, self.cfg = (ev, P, tuple(targets), ref_val,
            config)
        self.genome = Genome(config)
        self.cache: dict[bytes, Candidate] = {}
        self.solutions: dict[bytes, pareto.ReweightResult] = {}

    @property
    def fused(self) -> bool:
        c = self.cfg
        return (
            c.batched
            and c.fused
            and c.retrain == "epoch"
            and self.ev.mesh is None
            and c.reweight.solver == "device"
        )

    def solve(self, genomes: np.ndarray) -> list[pareto.ReweightResult]:
        """The programs of these genomes: one batched device solve, or one at a time (the
        memory-limited path; same programs, same answers)."""
        if self.cfg.batched:
            return pareto.solve_batch(self.genome.batch(self.P, genomes, self.targets))
        K = self.P.shape[1]
        return [
            pareto.solve_reweighting(self.P, self.targets, a, c, class_weights=b)
            for a, c, b in (self.genome.program_of(g, self.targets, K) for g in genomes)
        ]

    def generation(self, genomes: np.ndarray):
        """(program results, validation accuracies) of these genomes from one jitted call
        (`Evaluator.generation`)."""
        return self.ev.generation(self.genome.batch(self.P, genomes, self.targets))

    def _programs_and_accuracies(self, genomes: np.ndarray):
        """(program results, validation accuracies) of these genomes: one jitted generation
        (fused), or the programs then the (batched or sequential) epochs."""
        if self.fused:
            return self.generation(genomes)
        sols = self.solve(genomes)
        W = np.stack([s.w if s.w is not None else np.ones(self.P.shape[0]) for s in sols])
        params, _ = self.ev.train_many(W, self.cfg.batched)
        return sols, self.ev.accuracies(params, "val", self.cfg.batched)

    def evaluate(self, alphas: np.ndarray) -> list[Candidate]:
        keys = [np.asarray(a, np.float64).tobytes() for a in alphas]
        uniq: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in self.cache:
                uniq.setdefault(k, i)
        idx = list(uniq.values())
        if idx:
            K = self.P.shape[1]
            sols, acc = self._programs_and_accuracies(np.stack([alphas[i] for i in idx]))
            for j, i in enumerate(idx):
                d = relative_change(acc[j], self.ref_val)
                f, tb = fitness(d, self.targets) if sols[j].success else (NEG_INF, NEG_INF)
                g = np.asarray(alphas[i], np.float64)
                a, rcfg, _ = self.genome.program_of(g, self.targets, K)
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
    ref_params=None, config: SearchConfig = SearchConfig(), progress: bool = False,
    on_generation: Callable[[int, dict], None] | None = None, checkpoint: str | None = None,
    mesh=None) -> SearchResult:
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

    checks.check_choice(mode, "mode", ("direct", "course_correction"))
    K = problem.num_classes
    P = checks.as_influence_matrix(P, "P")
    if P.shape != (problem.x_train.shape[0], K):
        checks.fail("P", f"shape {P.shape}", f"({problem.x_train.shape[0]}, {K})",
            "compute P on this problem's training set")
    targets = checks.as_class_indices(targets, K)
    if mode == "course_correction" and ref_params is None:
        checks.fail("ref_params", "None", "the ordinary epoch e+1 params", "pass ref_params")
    ev = Evaluator(problem, config.retrain, config.retrain_max_iter, mesh)
    ref = problem.state.params if mode == "direct" else ref_params
    ref_val = np.asarray(ev.acc(ref, ev.xv, ev.yv), np.float64)
    pop = Population(ev, P, targets, ref_val, config)
    rng = np.random.default_rng(config.seed)
    start, genomes, history = _start(config, K, rng, pop, checkpoint)
    for g in tqdm(range(start, config.generations), initial=start, total=config.generations,
        disable=not progress, desc="search", unit="gen"):
        t0 = time.perf_counter()
        cands = pop.evaluate(genomes)
        history.append(_generation_record(g, cands, time.perf_counter() - t0))
        if g == config.generations - 1:
            continue  # (not break: the progress bar then shows the last generation as done)
        genomes = _next_generation(genomes, cands, rng, config)
        state = {"next_generation": g + 1, "population": genomes.tolist(),
            "rng_state": rng.bit_generator.state, "history": history,
            "candidates": [_cand_to_json(c) for c in pop.cache.values()]}
        if checkpoint is not None:
            io.write_json(checkpoint, state)
        if on_generation is not None:
            on_generation(g, state)
    return _result(mode, targets, P, pop, ev, ref, ref_val, history, config)


def _start(config: SearchConfig, K: int, rng, pop: Population, checkpoint):
    """(first generation, its genomes, history): a random population, or the checkpoint's."""
    lo, hi = config.alpha_range
    genomes = rng.uniform(lo, hi, (config.population, K + Genome(config).n_extra))
    if config.search_rho is not None:
        genomes[:, K] = rng.uniform(0.0, 1.0, config.population)
    if config.others_weight is not None:
        genomes[:, -1] = rng.uniform(0.0, 1.0, config.population)
    if checkpoint is None or not Path(checkpoint).exists():
        return 0, genomes, []
    state = rng.bit_generator.state
    try:
        st = io.read_json(checkpoint)
        rng.bit_generator.state = st["rng_state"]
        cands = [_cand_from_json(d, K) for d in st["candidates"]]
        start, pop_ = int(st["next_generation"]), np.asarray(st["population"], np.float64)
        if pop_.shape != genomes.shape or not 0 < start < config.generations:
            raise ValueError(f"a population of shape {pop_.shape} at generation {start}")
    except (OSError, ValueError, KeyError, TypeError) as e:  # damaged: start over, never crash
        import warnings

        warnings.warn(f"search checkpoint {checkpoint} is unreadable ({e}): the search starts over",
            stacklevel=2)
        rng.bit_generator.state = state
        return 0, genomes, []
    for c in cands:
        pop.cache[c.genome.tobytes()] = c
    return start, pop_, st["history"]


def _generation_record(g: int, cands: list[Candidate], seconds: float) -> dict:
    fin = [c.fitness for c in cands if np.isfinite(c.fitness)]
    best = max(cands, key=_rank_key)
    return {"generation": g, "best_fitness": best.fitness, "best_target_gain": best.tiebreak,
        "mean_finite_fitness": float(np.mean(fin)) if fin else NEG_INF, "n_finite": len(fin),
        "n_infeasible": sum(c.status != 0 for c in cands), "seconds": seconds}


def _result(
    mode, targets, P, pop: Population, ev: Evaluator, ref, ref_val, history, config: SearchConfig
) -> SearchResult:
    """The best candidate, its program solved once more on its own (so a resumed search, whose
    early candidates another process evaluated, returns exactly the same weights), retrained."""
    K = P.shape[1]
    everything = sorted(pop.cache.values(), key=_rank_key, reverse=True)
    best = everything[0]
    a, rcfg, beta = Genome(config).program_of(best.genome, targets, K)
    sol = pareto.solve_reweighting(P, targets, a, rcfg, class_weights=beta)
    w = sol.w
    params, _ = ev.train_one(w if w is not None else np.ones(P.shape[0]))
    ref_test = np.asarray(ev.acc(ref, ev.xt, ev.yt), np.float64)
    val_acc = np.asarray(ev.acc(params, ev.xv, ev.yv), np.float64)
    test_acc = np.asarray(ev.acc(params, ev.xt, ev.yt), np.float64)
    return SearchResult(mode, targets, best, w, sol.summary(), params, ref_val, ref_test, val_acc,
        test_acc, relative_change(val_acc, ref_val), relative_change(test_acc, ref_test),
        tuple(history), tuple(everything), bool(np.isfinite(best.fitness)),
        ev.correct(jax.tree_util.tree_map(lambda a: a[None], params), "test")[0])


def crossover(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
    """Uniform crossover with probability `rate` (each gene from either parent with
    probability 1/2), else a copy of the first parent."""
    if rng.random() < rate:
        return np.where(rng.random(a.shape[0]) < 0.5, a, b)
    return a.copy()


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
        child = crossover(a, b, rng, config.crossover_rate)
        mut = rng.random(K) < config.mutation_rate
        child = np.clip(child + mut * rng.normal(0, config.mutation_sigma, K), 0.0, 1.0)
        children.append(child)
    return np.stack(elite + children)
