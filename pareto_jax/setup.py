"""The set-up every job shares: the configured data and model (`load_data`, `build_model`)."""

from __future__ import annotations

from . import data, datasets, models
from .config import DataConfig, ModelConfig

# the image shape of the datasets whose samples are flattened images (for the CNN)
IMAGE_SHAPES = {"digits": (8, 8, 1), "mnist5k": (28, 28, 1)}


def load_data(cfg: DataConfig) -> data.Splits:
    """The splits of the configured dataset (`datasets.load_splits`)."""
    return datasets.load_splits(
        cfg.name, seed=cfg.seed, path=cfg.path, features=cfg.features, max_train=cfg.max_train
    )


def build_model(cfg: ModelConfig, splits: data.Splits, *, with_features: bool = False):
    """(apply, params) of the configured model for these splits; with `with_features`, also
    its penultimate-layer ``features(params, x)`` (`models.functional_features`)."""
    shape = cfg.image_shape or IMAGE_SHAPES.get(splits.train.name.split("/")[0])
    m = models.make_model(cfg.kind, splits.train.x.shape[1:], splits.num_classes, seed=cfg.seed,
        hidden=cfg.hidden, channels=cfg.channels, dense=cfg.dense, image_shape=shape)
    apply, params = models.functional(m)
    return (apply, params, models.functional_features(m)) if with_features else (apply, params)
