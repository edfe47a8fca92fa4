"""The main job that the CLI (``pareto-jax run``) and the notebooks call: train, influence,
ceiling test, weights (the program or the search), retraining, report.

``run(RunConfig(...))`` runs the stages in order; each is a named function below that computes
its artifact, writes it into the run folder next to the config that produced it, and loads it
back (so a rerun skips every finished stage whose config did not change). The records of the job
are `pareto_jax.config`'s (`RunConfig` and the stage configs); the data and model set-up it shares
with the experiments is `pareto_jax.setup`.
"""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np

from . import (
    cache,
    checks,
    data,
    distributed,
    influence,
    io,
    models,
    pareto,
    runs,
    search,
    setup,
    train,
    yardstick,
)
from .config import DataConfig, InfluenceConfig, ModelConfig, RunConfig  # noqa: F401  (the job's records)
from .report import class_mcnemar, fmt_value, format_table, harm_sentence, write_report  # noqa: F401
from .runs import Stages
from .setup import load_data


class ProgramFailed(RuntimeError):
    """The reweighting program had no optimal solution (its status is in the run folder)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"reweighting program: status {status} ({message})")
        self.status = status


class Job(NamedTuple):
    """What every stage of one run needs: the config, data, model and where to write."""

    config: RunConfig
    splits: data.Splits
    apply: Callable
    params0: Any
    loss_fn: Callable
    train_config: train.TrainConfig
    objective: train.Objective
    data_fp: str
    mesh: Any
    stages: Stages
    out: Any
    module: Any = None  # the nnx module of the params (K-FAC / EK-FAC read its layers)

    def metrics(self, params) -> dict:
        K = self.splits.num_classes
        return {
            n: train.evaluate(self.apply, params, d.x, d.y, K).to_dict()
            for n, d in (("train", self.splits.train), ("val", self.splits.val),
                ("test", self.splits.test))
        }

    def epoch_fn(self):
        n = len(self.splits.train)
        if self.mesh is None:
            return train.make_epoch_fn(self.loss_fn, self.train_config, n)
        return distributed.make_epoch_fn(self.loss_fn, self.train_config, n, self.mesh)


def make_job(config: RunConfig, out) -> Job:
    root = Path(config.out_dir)
    print(
        f"[data] loading {config.data.name} (text corpora are featurised on first use: a minute or "
        "two)"
        if config.data.name in ("emotion", "ag_news")
        else f"[data] loading {config.data.name}",
        file=out,
        flush=True,
    )
    t0 = time.perf_counter()
    splits = load_data(config.data)
    print(f"[data] done in {time.perf_counter() - t0:.1f} s", file=out, flush=True)
    if config.targets:  # checked before anything is written or trained
        checks.as_class_indices(config.targets, splits.num_classes, "targets (--targets)")
    mesh = distributed.mesh_from_setting(config.devices)
    runs.claim(root)  # a folder holding other files is refused, never written into
    runs.write_if_changed(root / "config.json", config)
    # the data's content, not its path: new data under the same name is a new run of every stage
    data_fp = io.fingerprint(
        *(a for d in (splits.train, splits.val, splits.test) for a in (d.x, d.y)),
        list(splits.class_names))
    built = setup.build(config.model, splits)
    apply, params0 = built.apply, built.params
    tcfg = config.train
    if tcfg.epochs not in tcfg.checkpoint_epochs:
        tcfg = dataclasses.replace(tcfg, checkpoint_epochs=(*tcfg.checkpoint_epochs, tcfg.epochs))
    print(
        f"dataset {splits.train.name.split('/')[0]}: {len(splits.train)} train / "
        f"{len(splits.val)} val / {len(splits.test)} test, {splits.num_classes} classes; "
        f"model {config.model.kind}",
        file=out,
    )
    loss_fn = models.per_sample_loss(apply)
    return Job(config, splits, apply, params0, loss_fn, tcfg, train.Objective.of(loss_fn, tcfg),
        data_fp, mesh, Stages(root, log=out), out, built.module)


def stage_train(job: Job, progress: bool):
    """1. Train; returns (checkpoint state, metrics before reweighting)."""
    config, st, tcfg = job.config, job.stages, job.train_config
    n_dev = 1 if job.mesh is None else distributed.describe(job.mesh)["devices"]
    fp = io.fingerprint("train", job.data_fp, config.data, config.model, tcfg,
        *(() if n_dev == 1 else (("devices", n_dev),)))
    tdir = st.root / "train"
    ckpt = train.checkpoint_path(tdir, tcfg.epochs)
    if not st.done("train", fp):
        st.start("train")
        res = train.train(job.loss_fn, job.params0, job.splits.train.x, job.splits.train.y, tcfg,
            num_classes=job.splits.num_classes, run_dir=tdir, progress=progress,
            epoch_fn=job.epoch_fn())
        metrics = job.metrics(res.params)
        metrics["history"] = list(res.history)
        io.write_json(tdir / "metrics.json", metrics)
        if not train.checkpoint_path(
            tdir, tcfg.epochs
        ).exists():  # never mark a failed stage finished
            raise RuntimeError(
                f"training wrote no checkpoint at {train.checkpoint_path(tdir, tcfg.epochs)}"
            )
        st.finish("train", fp, {"data": config.data, "model": config.model, "train": tcfg},
            [ckpt, ckpt.with_suffix(".json"), tdir / "metrics.json"])
    template = train.init_state(job.params0, tcfg)
    state = train.load_checkpoint(train.checkpoint_path(tdir, tcfg.epochs), template)
    return state, io.read_json(tdir / "metrics.json"), fp


def stage_influence(job: Job, state, fp_train: str, progress: bool = False):
    """2. The influence matrix P; returns (P, its diagnostics, fingerprint)."""
    st, s = job.stages, job.splits
    icfg = setup.product_influence(job.config.influence, job.config.model.kind)
    K = s.num_classes
    fp = io.fingerprint("influence", fp_train, icfg)  # (the resolved choice: EK-FAC, not None)
    if not st.done("influence", fp):
        st.start("influence")
        if icfg is None:  # a linear model: the closed form
            r = influence.linear_category_influence(state.params, s.train.x, s.train.y, s.val.x,
                s.val.y, num_classes=K, weight_decay=job.objective.weight_decay)
        else:
            with warnings.catch_warnings(record=True) as caught:  # (said once, in the log)
                warnings.simplefilter("always", influence.DampingWarning)
                r = influence.category_influence(job.objective, state.params, s.train.x, s.train.y,
                    s.val.x, s.val.y, num_classes=K, apply=job.apply, model=job.module,
                    mesh=job.mesh, progress=progress, config=icfg)
            for w in caught:
                if issubclass(w.category, influence.DampingWarning):
                    print(f"[influence] warning: {w.message}", file=job.out, flush=True)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        d = st.dir("influence")
        r = dataclasses.replace(r, names=tuple(s.class_names), sample_ids=np.arange(len(s.train)))
        r.save(
            d / "P.npz"
        )  # plain keys: P, names, sample_ids, solutions, meta (InfluenceResult.load)
        io.write_json(d / "influence.json", r.summary())
        st.finish("influence", fp, icfg, [d / "P.npz", d / "influence.json"])
    idir = st.root / "influence"
    P = influence.InfluenceResult.load(idir / "P.npz").P
    return np.asarray(P), io.read_json(idir / "influence.json"), fp


def stage_ceiling(job: Job, P, fp_inf: str) -> dict:
    """3. The ceiling test (exact LP and the PCA heuristic)."""
    fp = io.fingerprint("ceiling", fp_inf)
    f = job.stages.root / "ceiling" / "ceiling.json"
    if not job.stages.done("ceiling", fp):
        job.stages.start("ceiling")
        io.write_json(job.stages.dir("ceiling") / "ceiling.json", pareto.ceiling_test(P).summary())
        job.stages.finish("ceiling", fp, {}, [f])
    return io.read_json(job.stages.root / "ceiling" / "ceiling.json")


def stage_weights(job: Job, P, state, targets, fp_inf: str, progress: bool):
    """4. The weights: the program with the fixed α, or the search's; returns (stage name,
    program summary, fingerprint)."""
    config, st, s = job.config, job.stages, job.splits
    name = "program" if config.search is None else "search"
    fp = (
        io.fingerprint("program", fp_inf, targets, config.alpha, config.reweight, config.steps,
            config.retrain_epochs if config.steps else None)
        if name == "program"
        else io.fingerprint("search", fp_inf, targets, config.search)
    )
    if not st.done(name, fp):
        st.start(name)
        d = st.dir(name)
        if name == "program":
            sol = pareto.solve_reweighting(P, targets, config.alpha, config.reweight)
            w, prog = sol.w, {"targets": targets, "alpha": config.alpha, **sol.summary()}
            if w is not None and config.steps:
                w, choice, _ = yardstick.choose_step(job, state, w, targets)
                prog.update(choice)
            made_by = {"targets": targets, "alpha": config.alpha, "reweight": config.reweight,
                "steps": config.steps}
        else:
            prob = search.SearchProblem(job.loss_fn, job.apply, state, job.train_config, s.train.x,
                s.train.y, s.val.x, s.val.y, s.test.x, s.test.y, s.num_classes)
            r = search.run_search(prob, P, targets, config=config.search, progress=progress,
                checkpoint=str(d / f"state_{fp}.json"), mesh=job.mesh)
            w, prog = (
                r.weights,
                {"targets": targets, "alpha": r.best.alpha, "rho": r.best.rho,
                    "fitness": r.best.fitness, "found": r.found, "history": list(r.history),
                    **r.program},
            )
            made_by = {"targets": targets, "search": config.search}
        (d / "weights.npz").unlink(missing_ok=True)
        if w is not None:
            io.save_pytree(d / "weights.npz", {"w": w})
        io.write_json(d / "program.json", prog)
        st.finish(
            name, fp, made_by, [d / "program.json"] + ([d / "weights.npz"] if w is not None else [])
        )
    return name, io.read_json(st.root / name / "program.json"), fp


def stage_retrain(job: Job, state, w, fp_w: str) -> dict:
    """5. Retrain with the weights, beside the same number of unweighted epochs."""
    st, s, n_ep = job.stages, job.splits, job.config.retrain_epochs
    fp = io.fingerprint("retrain", fp_w, n_ep)
    f = st.root / "retrain" / "metrics.json"
    if not st.done("retrain", fp):
        st.start("retrain")
        kw = dict(state=state, epochs=n_ep, epoch_fn=job.epoch_fn())
        new = train.train(
            job.loss_fn, None, s.train.x, s.train.y, job.train_config, weights=w, **kw
        ).params
        plain = train.train(job.loss_fn, None, s.train.x, s.train.y, job.train_config, **kw).params
        correct = lambda p: (train.predict(job.apply, p, s.test.x) == s.test.y).astype(int).tolist()  # noqa: E731
        io.write_json(
            st.dir("retrain") / "metrics.json",
            {"reweighted": job.metrics(new), "unweighted": job.metrics(plain),
                "test_correct": {"reweighted": correct(new), "unweighted": correct(plain)}},
        )
        st.finish("retrain", fp, {"retrain_epochs": n_ep}, [f])
    return io.read_json(st.root / "retrain" / "metrics.json")


def _chain(st: Stages, weights_stage: str) -> dict:
    """The fingerprints of this run's own stages (what its summary describes)."""
    return {
        n: f
        for n, f in st.fingerprints().items()
        if n in ("train", "influence", "ceiling", weights_stage, "retrain", "baselines")
    }


def _print_weights(job: Job, summary: dict, prog: dict, out) -> None:
    """The console lines on the weights: the search's or the program's (its step)."""
    if "found" in prog:
        print(
            "search: "
            + (
                "found a weighting"
                if prog["found"]
                else "found no weighting better than w = 1 on validation"
            )
            + f" (alpha {fmt_value(prog.get('alpha'))}, rho {fmt_value(prog.get('rho'))}, fitness "
            f"{fmt_value(prog.get('fitness'))})",
            file=out,
        )
    else:
        print(
            f"program: alpha {fmt_value(prog.get('alpha'))}, "
            f"rho {fmt_value(job.config.reweight.rho)}"
            + (
                f", step {prog['step']:g} chosen on validation from "
                f"{list(prog['step_candidates'])} "
                f"({prog['step_note']})"
                if "step" in prog
                else ""
            ),
            file=out,
        )
    print(
        f"program: targets {summary['targets']}, {prog['n_saturated']} weights saturated, "
        f"max violation {prog['max_violation']:.1e}",
        file=out,
    )


def yardstick_lines(y: dict, n_ep: int) -> str:
    """The console table of `yardstick.compare`: the reweighting beside the simple baselines."""
    rows = y["rows"]
    names = list(rows)
    table = format_table(
        [n + (" (this run)" if n == "reweighted" else "") for n in names],
        {"step": np.array(["" if n == "reweighted" else f"{rows[n]['step']:g}" for n in names]),
            "targets (pts)": np.array([f"{rows[n]['target_gain']:+.1f}" for n in names]),
            "worst other (pts)": np.array([f"{rows[n]['worst_other']:+.1f}" for n in names])},
        label="method")
    return (f"yardstick: simple baselines given the same step rule on validation, each retrained "
        f"+{n_ep} ep; test points against the plain epochs\n{table}\nthe reweighting's mean target "
        f"gain minus the best baseline's ({y['best_baseline']}): {y['difference']:+.1f} points "
        "(one split and seed, no interval: `pareto-jax reproduce improve` repeats over seeds)")


def report(job: Job, summary: dict, before: dict, after: dict) -> dict:
    """6. summary.json and the console report: ceiling, program, per-class test accuracy."""
    names, out, root = job.splits.class_names, job.out, job.stages.root
    ceiling, prog = summary["ceiling"], summary["program"]
    summary["test_accuracy"] = {"before": before["test"]["accuracy"],
        "reweighted": after["reweighted"]["test"]["accuracy"],
        "unweighted": after["unweighted"]["test"]["accuracy"]}
    pvals = class_mcnemar(after, job.splits.test.y, len(names))
    summary["test_mcnemar_p"] = pvals
    summary["finished"] = True
    chain = _chain(job.stages, summary["weights_stage"])
    try:
        old = io.read_json(root / "summary.json")
    except (OSError, ValueError):
        old = None
    # a rerun that skipped every stage leaves the summary of the chain it reused as it is (a
    # finished run folder may be read-only)
    if (
        job.stages.ran
        or not isinstance(old, dict)
        or old.get("chain") != chain
        or not old.get("finished")
    ):
        io.write_json(root / "summary.json", {**summary, "chain": chain})
    print(
        "ceiling test: first-order Pareto improvement "
        f"{'exists' if ceiling['improvable'] else 'does not exist'} (t* = {ceiling['t_star']:.3g}; "
        f"PCA heuristic ratio {ceiling['pca_explained_ratio (heuristic)']:.2f})",
        file=out,
    )
    _print_weights(job, summary, prog, out)
    b = np.asarray(before["test"]["accuracy"])
    a = np.asarray(after["reweighted"]["test"]["accuracy"])
    u = np.asarray(after["unweighted"]["test"]["accuracy"])
    n_ep = job.config.retrain_epochs
    print(
        format_table(
            names,
            {"test before": b, f"+{n_ep} ep plain": u, f"+{n_ep} ep reweighted": a,
                "change (pts)": np.array([f"{100 * (x - y):+.1f}" for x, y in zip(a, u)]),
                "McNemar p": np.array([f"{p:.3f}" for p in pvals])},
        ),
        file=out,
    )
    print(harm_sentence(names, a - u, pvals, summary["targets"]), file=out)
    if "yardstick" in summary:
        print(yardstick_lines(summary["yardstick"], n_ep), file=out)
    print(
        f"overall test accuracy: before {before['test']['overall_accuracy']:.4f}, plain "
        f"{after['unweighted']['test']['overall_accuracy']:.4f}, reweighted "
        f"{after['reweighted']['test']['overall_accuracy']:.4f}; run folder {root} "
        f"(figures and tables: pareto-jax report {root})",
        file=out,
    )
    return summary


def _timed(job: Job, name: str, stage, *args):
    """Run one stage with a status line before and after (its wall time)."""
    print(f"[{name}] running", file=job.out, flush=True)
    t0 = time.perf_counter()
    r = stage(*args)
    print(f"[{name}] done in {time.perf_counter() - t0:.1f} s", file=job.out, flush=True)
    return r


def run(config: RunConfig = RunConfig(), *, progress: bool = True, out=None) -> dict:
    """The main job (see `RunConfig`), resumable: finished stages are skipped on a rerun.

    Writes into ``config.out_dir``: ``config.json``; ``train/`` (checkpoint, metrics),
    ``influence/`` (P.npz, diagnostics), ``ceiling/``, ``program/`` (weights, status) or
    ``search/`` (per-generation state, result), ``retrain/`` (before/after metrics); and
    ``summary.json``.

    Returns:
        The summary dict. Raises `ProgramFailed` if the program is infeasible (after writing
        its status).
    """
    cache.enable()  # an entry point: compiled solvers persist across processes (`pareto_jax.cache`)
    job = make_job(config, out or sys.stdout)
    names = job.splits.class_names
    state, before, fp_train = _timed(job, "train", stage_train, job, progress)
    P, inf_summary, fp_inf = _timed(
        job, "influence", stage_influence, job, state, fp_train, progress
    )
    ceiling = _timed(job, "ceiling", stage_ceiling, job, P, fp_inf)
    val_acc = np.asarray(before["val"]["accuracy"])
    targets = (
        tuple(config.targets)
        if config.targets
        else tuple(int(i) for i in np.argsort(val_acc, kind="stable")[:2])
    )
    name, prog, fp_w = _timed(
        job, "weights", stage_weights, job, P, state, targets, fp_inf, progress
    )
    st = job.stages
    summary = {"targets": [names[t] for t in targets], "ceiling": ceiling, "influence": inf_summary,
        "program": prog, "weights_stage": name, "finished": False, "stages_run": st.ran,
        "stages_skipped": st.skipped}
    if prog["status"] != 0:  # (a summary of the failure: `report` refuses it, naming the status)
        io.write_json(st.root / "summary.json", {**summary, "chain": _chain(st, name)})
        print(
            f"reweighting program for targets {[names[t] for t in targets]}: status "
            f"{prog['status']} ({prog['message']})",
            file=job.out,
        )
        raise ProgramFailed(prog["status"], prog["message"])
    w = np.asarray(
        io.load_pytree(st.root / name / "weights.npz", {"w": np.zeros(len(job.splits.train))})[0][
            "w"
        ]
    )
    after = _timed(job, "retrain", stage_retrain, job, state, w, fp_w)
    if config.baselines:  # the study's yardstick on this split (`pareto_jax.yardstick`)
        rows = _timed(job, "baselines", yardstick.stage_baselines, job, state, P, targets, fp_inf,
            after["unweighted"]["val"]["accuracy"])  # (the plain epochs, retrained once)
        summary["yardstick"] = yardstick.compare(rows, after["reweighted"]["test"]["accuracy"],
            after["unweighted"]["test"]["accuracy"], targets)
    return report(job, summary, before, after)
