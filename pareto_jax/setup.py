"""The set-up every job shares: the configured data and model (`load_data`, `build_model`)."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from . import data, datasets, models
from .config import DataConfig, InfluenceConfig, ModelConfig

# the image shape of the datasets whose samples are flattened images (for the CNN)
IMAGE_SHAPES = {"digits": (8, 8, 1), "mnist5k": (28, 28, 1)}


def load_data(cfg: DataConfig) -> data.Splits:
    """The splits of the configured dataset (`datasets.load_splits`)."""
    return datasets.load_splits(
        cfg.name, seed=cfg.seed, path=cfg.path, features=cfg.features, max_train=cfg.max_train
    )


class Built(NamedTuple):
    """The configured model: ``apply(params, x) -> logits``, its initial params, its
    penultimate-layer ``features(params, x)`` and the nnx module itself (K-FAC / EK-FAC read its
    layers)."""

    apply: Callable
    params: Any
    features: Callable
    module: Any


def build(cfg: ModelConfig, splits: data.Splits) -> Built:
    """The configured model for these splits (`Built`)."""
    shape = cfg.image_shape or IMAGE_SHAPES.get(splits.train.name.split("/")[0])
    m = models.make_model(cfg.kind, splits.train.x.shape[1:], splits.num_classes, seed=cfg.seed,
        hidden=cfg.hidden, channels=cfg.channels, dense=cfg.dense, image_shape=shape)
    apply, params = models.functional(m)
    return Built(apply, params, models.functional_features(m), m)


def build_model(cfg: ModelConfig, splits: data.Splits, *, with_features: bool = False):
    """(apply, params) of the configured model for these splits; with `with_features`, also
    its penultimate-layer ``features(params, x)`` (`models.functional_features`)."""
    b = build(cfg, splits)
    return (b.apply, b.params, b.features) if with_features else (b.apply, b.params)


def product_influence(config, model_kind: str):
    """The influence config a job runs for `model_kind`: None (the closed form) for a linear
    model; for a deep one the config given, or `InfluenceConfig.for_product()` (EK-FAC) when
    None. Run folders fingerprint this resolved value."""
    if model_kind == "linear" and config is None:
        return None
    return InfluenceConfig.for_product() if config is None else config
