"""The one pipeline that the CLI and the notebooks call.

``run(RunConfig(...))`` trains a model on a dataset (checkpointing), and each later stage
(influence, ceiling test, reweighting, retraining) writes its artifact into the run folder next
to the config that produced it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import _checks, data, io, models, train


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    path: str | None = None
    features: str = "tfidf"
    max_train: int | None = None
    seed: int = 0

    def __post_init__(self):
        _checks.check_choice(self.name, "dataset", data.DATASETS)
        _checks.check_choice(self.features, "features", ("tfidf", "minilm"))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    kind: str = "linear"
    hidden: tuple[int, ...] = (64,)
    channels: tuple[int, ...] = (8, 16)
    dense: int = 64
    image_shape: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self):
        _checks.check_choice(self.kind, "model", models.MODEL_KINDS)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: train.TrainConfig = train.TrainConfig(epochs=40, batch_size=128, learning_rate=0.05,
                                                 weight_decay=1e-3, checkpoint_epochs=(40,))
    out_dir: str = "runs/default"


def load_data(cfg: DataConfig) -> data.Splits:
    return data.load_splits(cfg.name, seed=cfg.seed, path=cfg.path, features=cfg.features,
                            max_train=cfg.max_train)


_IMAGE_SHAPES = {"digits": (8, 8, 1), "mnist5k": (28, 28, 1)}


def build_model(cfg: ModelConfig, splits: data.Splits):
    shape = cfg.image_shape or _IMAGE_SHAPES.get(splits.train.name.split("/")[0])
    m = models.make_model(cfg.kind, splits.train.x.shape[1:], splits.num_classes, seed=cfg.seed,
                          hidden=cfg.hidden, channels=cfg.channels, dense=cfg.dense,
                          image_shape=shape)
    apply, params = models.functional(m)
    return apply, params


def format_table(class_names, columns: dict[str, Any], *, fmt: str = "{:.3f}") -> str:
    """A plain-text table: one row per class, one column per named array."""
    names = [str(c) for c in class_names]
    w0 = max(5, *(len(n) for n in names))
    heads = list(columns)
    widths = [max(8, len(h)) for h in heads]
    lines = ["class".ljust(w0) + "  " + "  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    for i, n in enumerate(names):
        cells = []
        for h, w in zip(heads, widths):
            v = columns[h][i]
            cells.append((fmt.format(v) if isinstance(v, (float, np.floating)) else str(v)).rjust(w))
        lines.append(n.ljust(w0) + "  " + "  ".join(cells))
    return "\n".join(lines)


def run(config: RunConfig = RunConfig(), *, progress: bool = True, out=sys.stdout) -> dict:
    """Train the configured model on the configured data and write a run folder.

    The folder holds ``config.json``, ``metrics.json`` (per-class accuracy and loss on every
    split) and ``checkpoints/epoch_XXXX.npz`` (+ its config).

    Returns:
        The metrics dict (also written to ``metrics.json``).
    """
    out_dir = Path(config.out_dir)
    splits = load_data(config.data)
    apply, params = build_model(config.model, splits)
    loss_fn = models.per_sample_loss(apply)
    io.write_json(out_dir / "config.json", config)
    print(f"dataset {splits.train.name.split('/')[0]}: {len(splits.train)} train / "
          f"{len(splits.val)} val / {len(splits.test)} test, {splits.num_classes} classes; "
          f"model {config.model.kind}", file=out)
    tcfg = config.train
    if tcfg.epochs not in tcfg.checkpoint_epochs:
        tcfg = dataclasses.replace(tcfg, checkpoint_epochs=(*tcfg.checkpoint_epochs, tcfg.epochs))
    res = train.train(loss_fn, params, splits.train.x, splits.train.y, tcfg,
                      num_classes=splits.num_classes, run_dir=out_dir, progress=progress)
    metrics = {name: train.evaluate(apply, res.params, d.x, d.y, splits.num_classes).to_dict()
               for name, d in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    metrics["history"] = list(res.history)
    metrics["class_names"] = list(splits.class_names)
    metrics["checkpoints"] = {str(k): v for k, v in res.checkpoints.items()}
    io.write_json(out_dir / "metrics.json", metrics)
    print(format_table(splits.class_names, {
        "train acc": np.asarray(metrics["train"]["accuracy"]),
        "val acc": np.asarray(metrics["val"]["accuracy"]),
        "test acc": np.asarray(metrics["test"]["accuracy"]),
        "n test": np.asarray(metrics["test"]["counts"]),
    }), file=out)
    print(f"overall test accuracy {metrics['test']['overall_accuracy']:.4f}; run folder {out_dir}",
          file=out)
    return metrics
