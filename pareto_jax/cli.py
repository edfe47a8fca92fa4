"""Command-line front end: ``pareto-jax run | improve | reproduce``. Thin: it builds a config
and calls the pipeline.

Exit codes: 0 success; 2 bad arguments or input (the message names the argument and the fix);
3 a numerical failure (NaN/Inf, a solve that failed); 4 the reweighting program is infeasible.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from . import checks
from .config import (
    DATASETS,
    MODEL_KINDS,
    OPTIMIZERS,
    RETRAIN,
    TEXT_FEATURES,
    DataConfig,
    ImproveConfig,
    ModelConfig,
    ReweightConfig,
    RunConfig,
    SearchConfig,
    TrainConfig,
)


def _int_tuple(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")


def _float_tuple(s: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")


_RUN = RunConfig()
_IMPROVE = ImproveConfig()

# config field -> the flag that sets it (a config's error names the field; the CLI names the flag)
FLAGS = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "learning_rate": "--lr",
    "weight_decay": "--weight-decay",
    "optimizer": "--optimizer",
    "alpha": "--alpha",
    "rho": "--rho",
    "w_max": "--w-max",
    "steps": "--steps",
    "retrain_epochs": "--retrain-epochs",
    "population": "--population",
    "generations": "--generations",
    "max_train": "--max-train",
    "hidden": "--hidden",
    "targets": "--targets",
    "seed": "--seed",
    "dataset": "--dataset",
    "features": "--features",
    "model": "--model",
    "out_dir": "--out",
    "noise_fraction": "--noise",
    "noise_classes": "--noise-classes",
    "alpha_min": "--alpha-min",
    "rounds": "--rounds",
    "retrain": "--retrain",
    "elite": "--population",
    "alpha_range": "--alpha-min",
}


def _as_flag_error(e: checks.InputError) -> checks.InputError:
    """A config's error about field F as the same error about the flag that sets F."""
    flag = FLAGS.get(e.argument or "")
    if flag is None:
        return e
    return checks.InputError(
        str(e)
        .replace(f"argument `{e.argument}`", f"flag {flag}", 1)
        .replace(f"set `{e.argument}` to", f"pass {flag} as")
        .replace(f"{e.argument}=", f"{flag} "),
        flag,
    )


def _add_data_args(p: argparse.ArgumentParser, defaults: DataConfig) -> None:
    p.add_argument(
        "--dataset",
        default=defaults.name,
        choices=DATASETS,
        help="dataset: digits and mnist5k are shipped with packages; npz (your own features: "
        "--path FILE.npz with arrays x, y and optionally class_names, or x_train/y_train/"
        "x_val/y_val/x_test/y_test), cifar10 and stl10 need --path; emotion and ag_news "
        "read --path or $PARETO_JAX_DATA/<name> (default ../shared/data/<name>)",
    )
    p.add_argument(
        "--path", default=defaults.path, help="file or folder of the dataset (see --dataset)"
    )
    p.add_argument(
        "--features",
        default=defaults.features,
        choices=TEXT_FEATURES,
        help="text features for emotion / ag_news",
    )
    p.add_argument(
        "--max-train", type=int, default=defaults.max_train, help="cap on training samples"
    )
    p.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for splits, init and shuffling"
    )


def _add_model_args(p: argparse.ArgumentParser, model: ModelConfig, tc: TrainConfig) -> None:
    p.add_argument("--model", default=model.kind, choices=MODEL_KINDS, help="classifier to train")
    p.add_argument(
        "--hidden", type=_int_tuple, default=model.hidden, help="MLP hidden sizes, e.g. 128,64"
    )
    p.add_argument("--epochs", type=int, default=tc.epochs, help="training epochs (>= 1)")
    p.add_argument("--batch-size", type=int, default=tc.batch_size, help="minibatch size")
    p.add_argument("--lr", type=float, default=tc.learning_rate, help="learning rate (> 0)")
    p.add_argument(
        "--weight-decay",
        type=float,
        default=tc.weight_decay,
        help="L2 weight decay λ (part of the influence Hessian)",
    )
    p.add_argument("--optimizer", default=tc.optimizer, choices=OPTIMIZERS, help="optax optimizer")


def _flag(ok: bool, flag: str, value, expected: str, fix: str) -> None:
    if not ok:
        raise checks.InputError(
            f"flag {flag}: got {value!r}; expected {expected}. Fix: {fix}", flag
        )


def _run_config(a) -> RunConfig:
    """The `RunConfig` of `run`'s flags: every flag checked by the configs it fills (errors name
    the flag), plus what only the command line knows; before anything else is imported."""
    _flag(
        a.epochs >= 1,
        "--epochs",
        a.epochs,
        "an integer >= 1",
        "train for at least one epoch, e.g. --epochs 40",
    )
    _flag(
        a.dataset not in ("npz", "cifar10", "stl10") or a.path is not None,
        "--path",
        a.path,
        f"the file or folder of the {a.dataset} data",
        f"pass --path with --dataset {a.dataset}",
    )
    _flag(
        a.rho == a.rho and a.rho >= 0,
        "--rho",
        a.rho,
        "a number >= 0 (0 turns the trust region off)",
        "e.g. --rho 0.5",
    )
    try:
        search = SearchConfig(
            population=a.population, generations=a.generations, seed=a.seed
        )  # (checked always)
        return RunConfig(
            targets=a.targets or None,
            alpha=a.alpha,
            reweight=ReweightConfig(w_max=a.w_max, rho=None if a.rho == 0 else a.rho),
            search=search if a.search else None,
            retrain_epochs=a.retrain_epochs,
            steps=tuple(a.steps),
            data=DataConfig(
                name=a.dataset, path=a.path, features=a.features, max_train=a.max_train, seed=a.seed
            ),
            model=ModelConfig(kind=a.model, hidden=a.hidden, seed=a.seed),
            train=TrainConfig(
                epochs=a.epochs,
                batch_size=a.batch_size,
                learning_rate=a.lr,
                weight_decay=a.weight_decay,
                optimizer=a.optimizer,
                seed=a.seed,
                checkpoint_epochs=(a.epochs,),
            ),
            out_dir=a.out or RunConfig.out_dir,
            devices=a.devices,
        )
    except checks.InputError as e:
        raise _as_flag_error(e) from None


def _improve_config(a) -> ImproveConfig:
    """The `ImproveConfig` of `improve`'s flags (checked by the configs; errors name the flag)."""
    _flag(
        len(a.noise_classes) >= 1 and min(a.noise_classes) >= 0 and max(a.noise_classes) <= 9,
        "--noise-classes",
        a.noise_classes,
        "digit classes in 0..9",
        "e.g. --noise-classes 3,8",
    )
    try:
        reweight = ReweightConfig(w_max=a.w_max)
        return ImproveConfig(
            data=DataConfig(name=a.dataset, seed=a.seed),
            noise_classes=a.noise_classes,
            noise_fraction=a.noise,
            search=SearchConfig(
                population=a.population,
                generations=a.generations,
                seed=a.seed,
                retrain=a.retrain,
                alpha_range=(min(max(a.alpha_min, 0.0), 1.0), 1.0),
                reweight=reweight,
            ),
            alpha_min=a.alpha_min,
            reweight=reweight,
            retrain=a.retrain,
            rounds=a.rounds,
            out_dir=a.out,
        )
    except checks.InputError as e:
        raise _as_flag_error(e) from None


def default_out(a) -> str:
    """runs/<dataset>-<model>-<8 hex of the config>: the same config reuses its folder (resume),
    a different one never overwrites it."""
    import dataclasses

    from . import io

    cfg = dataclasses.replace(_run_config(a), out_dir="-")
    return f"runs/{a.dataset}-{a.model}-{io.fingerprint('run', cfg)[:8]}"


def _devices(s: str):
    if s == "all":
        return "all"
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or 'all', got {s!r}"
        ) from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {s!r}")
    return v


def _add_run_parser(sub, fmt) -> None:
    p = sub.add_parser(
        "run",
        help="train the model on a dataset and report per-class accuracy",
        formatter_class=fmt,
    )
    _add_data_args(p, _RUN.data)
    _add_model_args(p, _RUN.model, _RUN.train)
    p.add_argument(
        "--targets",
        type=_int_tuple,
        default=_RUN.targets,
        help="classes to improve, e.g. 3,8 (default: the two weakest on validation)",
    )
    p.add_argument(
        "--alpha", type=float, default=_RUN.alpha, help="program threshold for every class"
    )
    p.add_argument(
        "--rho", type=float, default=_RUN.reweight.rho, help="trust region |w-1| <= rho (0: off)"
    )
    p.add_argument(
        "--w-max", type=float, default=_RUN.reweight.w_max, help="upper bound on weights"
    )
    p.add_argument(
        "--steps",
        type=_float_tuple,
        default=_RUN.steps,
        help="steps t of w = 1 + t(w* - 1) tried on validation (retrained each) to pick the "
        "program's step; an empty string uses w* as solved",
    )
    p.add_argument("--search", action="store_true", help="search alpha with PARETO-LP-GA")
    p.add_argument(
        "--population",
        type=int,
        default=SearchConfig.population,
        help="search population (with --search)",
    )
    p.add_argument(
        "--generations",
        type=int,
        default=SearchConfig.generations,
        help="search generations (with --search)",
    )
    p.add_argument(
        "--retrain-epochs",
        type=int,
        default=_RUN.retrain_epochs,
        help="epochs with the new weights, beside as many plain epochs (the comparison)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="run folder; finished stages are reused (default: "
        "runs/<dataset>-<model>-<hash of the config>, so different configs never overwrite each "
        "other)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument(
        "--devices",
        type=_devices,
        default=None,
        help="shard over this many devices ('all' for every device; default: one)",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process job: call jax.distributed.initialize() first (TPU pod "
        "slices, SLURM; or set PARETO_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID)",
    )


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    fmt = argparse.ArgumentDefaultsHelpFormatter
    ap = argparse.ArgumentParser(
        prog="pareto-jax",
        formatter_class=fmt,
        description="Can a trained classifier still be improved for every class at once by "
        "re-weighting its own training data?",
    )
    ap.add_argument("--version", action="version", version=f"pareto-jax {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    _add_run_parser(sub, fmt)

    q = sub.add_parser(
        "improve",
        help="label-noise experiment: Direct Improvement, Course "
        "Correction, baselines and the Pareto frontier",
        formatter_class=fmt,
    )
    q.add_argument(
        "--dataset", default=_IMPROVE.data.name, choices=("digits", "mnist5k"), help="dataset"
    )
    q.add_argument(
        "--noise-classes",
        type=_int_tuple,
        default=_IMPROVE.noise_classes,
        help="classes whose labels are flipped",
    )
    q.add_argument(
        "--noise",
        type=float,
        default=_IMPROVE.noise_fraction,
        help="fraction of each noisy class flipped",
    )
    q.add_argument(
        "--population", type=int, default=SearchConfig.population, help="search population"
    )
    q.add_argument(
        "--generations", type=int, default=SearchConfig.generations, help="search generations"
    )
    q.add_argument(
        "--retrain",
        default=_IMPROVE.retrain,
        choices=RETRAIN,
        help="evaluate a weighting by retraining to convergence or by one weighted epoch",
    )
    q.add_argument(
        "--alpha-min",
        type=float,
        default=_IMPROVE.alpha_min,
        help="draw the initial α from [alpha-min, 1] (near 1: close to a Pareto step)",
    )
    q.add_argument(
        "--w-max",
        type=float,
        default=_IMPROVE.reweight.w_max,
        help="upper bound on a weight (1: down-weighting only, the default; 2: the "
        "method's up-weighting too)",
    )
    q.add_argument(
        "--rounds",
        type=int,
        default=_IMPROVE.rounds,
        help="iterated Direct Improvement rounds (linear model, --retrain converge)",
    )
    q.add_argument(
        "--seed", type=int, default=_IMPROVE.data.seed, help="seed for data, noise, init and search"
    )
    q.add_argument("--out", default=_IMPROVE.out_dir, help="output folder")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")

    rep = sub.add_parser(
        "report",
        help="write RUN_DIR/report/report.md (table, tests, figures) for a finished run",
        formatter_class=fmt,
    )
    rep.add_argument("run_dir", help="a run folder written by `pareto-jax run`")

    r = sub.add_parser(
        "reproduce",
        help="reproduce an experiment of the method and write a report",
        formatter_class=fmt,
    )
    r.add_argument("experiment", choices=("synthetic", "deletion", "improve", "frontier"))
    r.add_argument(
        "--dataset",
        default=None,
        help="deletion: digits (default), mnist5k, emotion, ag_news, cifar10, stl10; "
        "improve: emotion, ag_news, digits, mnist5k, mnist5k-noisy or all (default; "
        "comma-separated lists too); frontier: mnist5k (default) or digits",
    )
    r.add_argument(
        "--resume",
        action="store_true",
        help="improve: read back seeds already finished in the report folder instead of "
        "rerunning them",
    )
    r.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="improve: seeds per dataset (default 5; 1 with --quick)",
    )
    r.add_argument(
        "--model",
        default=None,
        choices=("linear", "cnn", "cnn-features"),
        help="deletion on digits / mnist5k: linear on pixels (default), the CNN's penultimate "
        "features (cnn-features), or the whole CNN (cnn)",
    )
    r.add_argument("--path", default=None, help="dataset files for cifar10 / stl10")
    r.add_argument("--quick", action="store_true", help="small sizes (CI)")
    r.add_argument("--seed", type=int, default=0, help="seed")
    r.add_argument("--out", default=None, help="report folder (default reports/<experiment>)")
    return ap


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings(
        "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
    )
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        if a.command == "run":
            import dataclasses

            cfg = _run_config(a)  # every flag checked before JAX is imported
            if a.out is None:
                cfg = dataclasses.replace(cfg, out_dir=default_out(a))
            from . import cache, pipeline

            cache.enable()
            if a.distributed:
                from . import distributed

                print(f"distributed: {distributed.initialize()}", file=sys.stderr)
            pipeline.run(cfg, progress=not a.no_progress)
            return 0
        if a.command == "report":
            from . import pipeline

            print(f"wrote {pipeline.write_report(a.run_dir)}")
            return 0
        if a.command == "improve":
            cfg = _improve_config(a)
            from . import cache, experiments

            cache.enable()
            experiments.run_improve(cfg, progress=not a.no_progress)
            return 0
        if a.command == "reproduce":
            if a.experiment == "improve":
                if a.seed != 0:
                    checks.fail(
                        "--seed",
                        str(a.seed),
                        "not used by improve",
                        "use --seeds N (seeds 0 .. N-1)",
                    )
                if a.seeds is not None and a.seeds < 1:
                    checks.fail("--seeds", str(a.seeds), "at least 1", "e.g. --seeds 5")
            else:
                checks.check_seed(a.seed, "--seed")
            from . import cache, reproduce

            cache.enable()
            out = a.out or (
                f"reports/{a.experiment}"
                + (f"_{a.dataset}" if a.dataset and a.experiment == "deletion" else "")
                + (f"_{a.model}" if a.model and a.experiment == "deletion" else "")
            )
            if a.experiment == "synthetic":
                reproduce.reproduce_synthetic(out, quick=a.quick, seed=a.seed)
            elif a.experiment == "deletion":
                reproduce.reproduce_deletion(
                    a.dataset or "digits",
                    out,
                    quick=a.quick,
                    seed=a.seed,
                    path=a.path,
                    model=a.model or "linear",
                )
            elif a.experiment == "frontier":
                reproduce.reproduce_frontier(out, quick=a.quick, seed=a.seed, dataset=a.dataset)
            else:
                ds = None if a.dataset in (None, "all") else a.dataset.split(",")
                reproduce.reproduce_improve(
                    out, datasets=ds, seeds=a.seeds, quick=a.quick, resume=a.resume
                )
            return 0
    except checks.InputError as e:
        print(f"pareto-jax: error: {e}", file=sys.stderr)
        return 2
    except checks.NumericalError as e:
        print(f"pareto-jax: numerical failure: {e}", file=sys.stderr)
        return 3
    except FileNotFoundError as e:
        print(f"pareto-jax: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .pipeline import ProgramFailed

        if isinstance(e, ProgramFailed):
            print(f"pareto-jax: {e}. Fix: lower --alpha or widen --rho / --w-max.", file=sys.stderr)
            return 4
        raise
    return 1


if __name__ == "__main__":
    sys.exit(main())
