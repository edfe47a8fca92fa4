"""The command line's parser: every flag, its help, and its default read from the configs."""

from __future__ import annotations

import argparse

from .config import (
    DATASETS,
    MODEL_KINDS,
    OPTIMIZERS,
    PRODUCT_INFLUENCE,
    RETRAIN,
    TEXT_FEATURES,
    DataConfig,
    ImproveConfig,
    ModelConfig,
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
    p.add_argument("--features", default=defaults.features, choices=TEXT_FEATURES,
        help="text features for emotion / ag_news")
    p.add_argument(
        "--max-train", type=int, default=defaults.max_train, help="cap on training samples"
    )
    p.add_argument(
        "--seed", type=int, default=defaults.seed, help="seed for splits, init and shuffling"
    )


def _add_model_args(p: argparse.ArgumentParser, model: ModelConfig, tc: TrainConfig) -> None:
    p.add_argument("--model", default=model.kind, choices=MODEL_KINDS, help="classifier to train")
    p.add_argument("--influence", default=None, choices=PRODUCT_INFLUENCE,
        help="how P is computed for a deep model (mlp, cnn): ekfac (the default: seconds), kfac, "
        "or cg (Gauss-Newton conjugate gradients: the exact solve, minutes on a CNN); a linear "
        "model's P is exact in closed form")
    p.add_argument(
        "--hidden", type=_int_tuple, default=model.hidden, help="MLP hidden sizes, e.g. 128,64"
    )
    p.add_argument("--epochs", type=int, default=tc.epochs, help="training epochs (>= 1)")
    p.add_argument("--batch-size", type=int, default=tc.batch_size, help="minibatch size")
    p.add_argument("--lr", type=float, default=tc.learning_rate, help="learning rate (> 0)")
    p.add_argument("--weight-decay", type=float, default=tc.weight_decay,
        help="L2 weight decay λ (part of the influence Hessian)")
    p.add_argument("--optimizer", default=tc.optimizer, choices=OPTIMIZERS, help="optax optimizer")


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
    p = sub.add_parser("run", help="train the model on a dataset and report per-class accuracy",
        formatter_class=fmt)
    _add_data_args(p, _RUN.data)
    _add_model_args(p, _RUN.model, _RUN.train)
    p.add_argument("--targets", type=_int_tuple, default=_RUN.targets,
        help="classes to improve, e.g. 3,8 (default: the two weakest on validation)")
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
    p.add_argument("--population", type=int, default=SearchConfig.population,
        help="search population (with --search)")
    p.add_argument("--generations", type=int, default=SearchConfig.generations,
        help="search generations (with --search)")
    p.add_argument("--retrain-epochs", type=int, default=_RUN.retrain_epochs,
        help="epochs with the new weights, beside as many plain epochs (the comparison)")
    p.add_argument("--no-baselines", action="store_true",
        help="skip the yardstick: class-balanced, trim-negative and top-k weights given the same "
        "step rule, retrained and reported beside the reweighting")
    p.add_argument(
        "--out",
        default=None,
        help="run folder; finished stages are reused (default: "
        "runs/<dataset>-<model>-<hash of the config>, so different configs never overwrite each "
        "other)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--devices", type=_devices, default=None,
        help="shard over this many devices ('all' for every device; default: one)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process job: call jax.distributed.initialize() first (TPU pod "
        "slices, SLURM; or set PARETO_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID)",
    )


def _add_improve_parser(sub, fmt) -> None:
    q = sub.add_parser(
        "improve",
        help="label-noise experiment: Direct Improvement, Course "
        "Correction, baselines and the Pareto frontier",
        formatter_class=fmt,
    )
    q.add_argument(
        "--dataset", default=_IMPROVE.data.name, choices=("digits", "mnist5k"), help="dataset"
    )
    q.add_argument("--noise-classes", type=_int_tuple, default=_IMPROVE.noise_classes,
        help="classes whose labels are flipped")
    q.add_argument("--noise", type=float, default=_IMPROVE.noise_fraction,
        help="fraction of each noisy class flipped")
    q.add_argument(
        "--population", type=int, default=SearchConfig.population, help="search population"
    )
    q.add_argument(
        "--generations", type=int, default=SearchConfig.generations, help="search generations"
    )
    q.add_argument("--retrain", default=_IMPROVE.retrain, choices=RETRAIN,
        help="evaluate a weighting by retraining to convergence or by one weighted epoch")
    q.add_argument("--alpha-min", type=float, default=_IMPROVE.alpha_min,
        help="draw the initial α from [alpha-min, 1] (near 1: close to a Pareto step)")
    q.add_argument(
        "--w-max",
        type=float,
        default=_IMPROVE.reweight.w_max,
        help="upper bound on a weight (1: down-weighting only, the default; 2: the "
        "method's up-weighting too)",
    )
    q.add_argument("--rounds", type=int, default=_IMPROVE.rounds,
        help="iterated Direct Improvement rounds (linear model, --retrain converge)")
    q.add_argument(
        "--seed", type=int, default=_IMPROVE.data.seed, help="seed for data, noise, init and search"
    )
    q.add_argument("--out", default=_IMPROVE.out_dir, help="output folder")
    q.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_report_parser(sub, fmt) -> None:
    rep = sub.add_parser("report",
        help="write RUN_DIR/report/report.md (table, tests, figures) for a finished run",
        formatter_class=fmt)
    rep.add_argument("run_dir", help="a run folder written by `pareto-jax run`")


def _add_reproduce_parser(sub, fmt) -> None:
    r = sub.add_parser("reproduce", help="reproduce an experiment of the method and write a report",
        formatter_class=fmt)
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
    r.add_argument("--seeds", type=int, default=None,
        help="improve: seeds per dataset (default 5; 1 with --quick)")
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

    _add_improve_parser(sub, fmt)
    _add_report_parser(sub, fmt)
    _add_reproduce_parser(sub, fmt)
    return ap
