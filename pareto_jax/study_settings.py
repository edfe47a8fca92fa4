"""The improvement study's settings: one experiment per dataset (`SETTINGS`), the rows the
report compares, and the original paper's figures shown beside ours."""

from __future__ import annotations

import dataclasses

from .config import InfluenceConfig, ModelConfig, TrainConfig

SEARCH_ROW = "search (PARETO-LP-GA)"


REFERENCE_ROW = "unweighted"


# the methods driven by the unrolled estimator (`experiments.ImproveConfig.unroll`); with the
# search, the influence-based methods every val-matched baseline is compared with
UNROLL_ROWS = ("search (unroll)", "rounds (unroll)", "program (unroll), val-matched")
INFLUENCE_ROWS = (SEARCH_ROW, *UNROLL_ROWS)


# The original paper's Direct Improvement on CIFAR-10 (epoch 10 → 11, targets 0 and 2; relative
# per-class accuracy change, %). A different dataset and model: shown beside ours, never compared.
PAPER_CIFAR10 = {"dataset": "CIFAR-10 (paper, ResNet; a different dataset)",
    "target_gain_relative_pct": [16.0, 11.0], "worst_other_relative_pct": -2.9}


@dataclasses.dataclass(frozen=True)
class StudySetting:
    """One dataset's experiment: data, model, training, label noise and number of targets."""

    dataset: str
    model: ModelConfig
    train: TrainConfig
    features: str = "tfidf"
    noise_classes: tuple[int, ...] = ()
    noise_fraction: float = 0.0
    n_targets: int = 2
    max_train: int | None = None
    influence: InfluenceConfig | str | None = None
    description: str = ""


# deep models: Gauss-Newton CG, automatic damping, stopped at a relative residual of 1e-3 (on the
# digits CNN, P then differs from P at 1e-6 by 0.5 % in norm, for half the CG steps)
INFLUENCE = InfluenceConfig(curvature="gauss_newton", rtol=1e-3)


_TEXT_TRAIN = TrainConfig(epochs=12, batch_size=128, learning_rate=1e-3, weight_decay=1e-4)


# the CNN's training, also the deletion check's (`reproduce.reproduce_deletion`, model "cnn*")
CNN_TRAIN = TrainConfig(epochs=15, batch_size=64, learning_rate=3e-3, weight_decay=1e-4)


SETTINGS: dict[str, StudySetting] = {
    "emotion": StudySetting(
        "emotion",
        ModelConfig("mlp", hidden=(64,)),
        _TEXT_TRAIN,
        features="minilm",
        description="Emotion (6 classes; its own train/val/test files), MiniLM "
        "embeddings (384), MLP head (64 tanh units)",
    ),
    "ag_news": StudySetting(
        "ag_news",
        ModelConfig("mlp", hidden=(64,)),
        _TEXT_TRAIN,
        features="minilm",
        n_targets=1,
        description="AG News (4 classes; its 7,600-text test file split 60/20/20), "
        "MiniLM embeddings (384), MLP head (64 tanh units); target: "
        "the class weakest on validation",
    ),
    "digits": StudySetting("digits", ModelConfig("cnn", channels=(8, 16), dense=64), CNN_TRAIN,
        description="scikit-learn digits (8×8, 10 classes), CNN (conv 8-16, dense 64)"),
    # the whole-network Gauss-Newton CG took over 7 minutes per influence matrix here (2 CPU
    # cores, 3,000 28×28 images, 330 CG steps per class): MNIST-5k uses last-layer influence
    "mnist5k": StudySetting(
        "mnist5k",
        ModelConfig("cnn", channels=(8, 16), dense=64),
        CNN_TRAIN,
        influence="last_layer",
        description="MNIST-5k (28×28, 10 classes), CNN (conv 8-16, dense 64); "
        "influence through the last layer (closed form on the CNN's "
        "penultimate activations)",
    ),
    "mnist5k-noisy": StudySetting(
        "mnist5k",
        ModelConfig("linear"),
        TrainConfig(epochs=20, batch_size=128, learning_rate=0.003, weight_decay=1e-3),
        noise_classes=(3, 8),
        noise_fraction=0.4,
        description="controlled case: MNIST-5k with 40 % of the training "
        "labels of classes 3 and 8 flipped, linear softmax",
    ),
}
