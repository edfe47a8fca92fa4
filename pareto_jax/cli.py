"""Command-line front end: ``pareto-jax run | improve | reproduce``. Thin: it builds a config
and calls the pipeline.

Exit codes: 0 success; 2 bad arguments or input (the message names the argument and the fix);
3 a numerical failure (NaN/Inf, a solve that failed); 4 the reweighting program is infeasible.
"""

from __future__ import annotations

import os
import sys
import warnings

from . import checks
from .cli_parser import build_parser
from .config import (
    DataConfig,
    ImproveConfig,
    InfluenceConfig,
    ModelConfig,
    ReweightConfig,
    RunConfig,
    SearchConfig,
    TrainConfig,
)

# config field -> the flag that sets it (a config's error names the field; the CLI names the flag)
FLAGS = {"epochs": "--epochs", "batch_size": "--batch-size", "learning_rate": "--lr",
    "weight_decay": "--weight-decay", "optimizer": "--optimizer", "alpha": "--alpha",
    "rho": "--rho", "w_max": "--w-max", "steps": "--steps", "retrain_epochs": "--retrain-epochs",
    "population": "--population", "generations": "--generations", "max_train": "--max-train",
    "hidden": "--hidden", "targets": "--targets", "seed": "--seed", "dataset": "--dataset",
    "features": "--features", "model": "--model", "out_dir": "--out", "noise_fraction": "--noise",
    "noise_classes": "--noise-classes", "alpha_min": "--alpha-min", "rounds": "--rounds",
    "retrain": "--retrain", "path": "--path", "elite": "--population", "alpha_range": "--alpha-min",
    "distributed": "--distributed"}


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


def _flag(ok: bool, flag: str, value, expected: str, fix: str) -> None:
    if not ok:
        raise checks.InputError(
            f"flag {flag}: got {value!r}; expected {expected}. Fix: {fix}", flag
        )


def run_config(a) -> RunConfig:
    """The `RunConfig` of `run`'s flags: every flag checked by the configs it fills (errors name
    the flag), plus what only the command line knows; before anything else is imported."""
    _flag(a.epochs >= 1, "--epochs", a.epochs, "an integer >= 1",
        "train for at least one epoch, e.g. --epochs 40")
    _flag(a.dataset not in ("npz", "cifar10", "stl10") or a.path is not None, "--path", a.path,
        f"the file or folder of the {a.dataset} data", f"pass --path with --dataset {a.dataset}")
    _flag(a.rho == a.rho and a.rho >= 0, "--rho", a.rho,
        "a number >= 0 (0 turns the trust region off)", "e.g. --rho 0.5")
    _flag(a.out is None or bool(a.out.strip()), "--out", a.out, "a folder name",
        "name a folder, or leave --out out (runs/<dataset>-<model>-<hash of the config>)")
    _flag(a.influence is None or a.model != "linear", "--influence", a.influence,
        "no --influence with --model linear (its P is exact, in closed form)",
        "drop --influence, or choose --model mlp / cnn")
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
            train=TrainConfig(epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.lr,
                weight_decay=a.weight_decay, optimizer=a.optimizer, seed=a.seed,
                checkpoint_epochs=(a.epochs,)),
            out_dir=a.out or RunConfig.out_dir,
            devices=a.devices,
            baselines=not a.no_baselines,
            influence=None
            if a.model == "linear"
            else InfluenceConfig.for_product(a.influence),
        )
    except checks.InputError as e:
        raise _as_flag_error(e) from None


def _improve_config(a) -> ImproveConfig:
    """The `ImproveConfig` of `improve`'s flags (checked by the configs; errors name the flag)."""
    _flag(len(a.noise_classes) >= 1 and min(a.noise_classes) >= 0 and max(a.noise_classes) <= 9,
        "--noise-classes", a.noise_classes, "digit classes in 0..9", "e.g. --noise-classes 3,8")
    try:
        reweight = ReweightConfig(w_max=a.w_max)
        return ImproveConfig(
            data=DataConfig(name=a.dataset, seed=a.seed),
            noise_classes=a.noise_classes,
            noise_fraction=a.noise,
            search=SearchConfig(population=a.population, generations=a.generations, seed=a.seed,
                retrain=a.retrain, alpha_range=(min(max(a.alpha_min, 0.0), 1.0), 1.0),
                reweight=reweight),
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

    cfg = dataclasses.replace(run_config(a), out_dir="-")
    return f"runs/{a.dataset}-{a.model}-{io.fingerprint('run', cfg)[:8]}"


def _run(a) -> int:
    import dataclasses

    cfg = run_config(a)  # every flag checked before JAX is imported
    if a.out is None:
        cfg = dataclasses.replace(cfg, out_dir=default_out(a))
    from . import cache, pipeline

    cache.enable()
    if a.distributed:
        from . import distributed

        print(f"distributed: {distributed.initialize()}", file=sys.stderr)
    pipeline.run(cfg, progress=not a.no_progress)
    return 0


def _improve(a) -> int:
    cfg = _improve_config(a)
    from . import cache, experiments

    cache.enable()
    experiments.run_improve(cfg, progress=not a.no_progress)
    return 0


def _reproduce(a) -> int:
    if a.experiment == "improve":
        if a.seed != 0:
            checks.fail(
                "--seed", str(a.seed), "not used by improve", "use --seeds N (seeds 0 .. N-1)"
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
        reproduce.reproduce_deletion(a.dataset or "digits", out, quick=a.quick, seed=a.seed,
            path=a.path, model=a.model or "linear")
    elif a.experiment == "frontier":
        reproduce.reproduce_frontier(out, quick=a.quick, seed=a.seed, dataset=a.dataset)
    else:
        ds = None if a.dataset in (None, "all") else a.dataset.split(",")
        reproduce.reproduce_improve(out, datasets=ds, seeds=a.seeds, quick=a.quick, resume=a.resume)
    return 0


def _report(a) -> int:
    from . import pipeline

    print(f"wrote {pipeline.write_report(a.run_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings(
        "ignore", message="JAXopt is no longer maintained", category=DeprecationWarning
    )
    a = build_parser().parse_args(argv)
    if "jax" not in sys.modules:
        # XLA's C++ log, before jax is imported: at its default level, every program loaded from
        # the compilation cache (`cache`) on CPU logs an ERROR that the compile machine's
        # "+prefer-no-gather/+prefer-no-scatter" are not host features, "could lead to SIGILL"
        # (openxla/xla#44565: LLVM tuning flags, not instructions; the program loads and runs, on
        # the machine that compiled it). Only fatal messages by default; TF_CPP_MIN_LOG_LEVEL=0
        # shows them all.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    commands = {"run": _run, "report": _report, "improve": _improve, "reproduce": _reproduce}
    try:
        return commands[a.command](a)
    except checks.InputError as e:
        print(f"pareto-jax: error: {_as_flag_error(e)}", file=sys.stderr)
        return 2
    except checks.NumericalError as e:
        print(f"pareto-jax: numerical failure: {e}", file=sys.stderr)
        return 3
    except FileNotFoundError as e:
        print(f"pareto-jax: error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(
            f"pareto-jax: error: cannot write {e.filename}: permission denied. Fix: choose a "
            "folder you can write (--out), or make this one writable",
            file=sys.stderr,
        )
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
