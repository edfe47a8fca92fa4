"""Datasets: records, seeded stratified splits, synthetic disks, label noise (`records`), and
offline loaders (`files`).

Example:
    >>> from pareto_jax import data
    >>> splits = data.stratified_split(data.load_digits(), seed=0)
    >>> splits.train.num_classes
    10
"""

from .files import (
    AG_NEWS_CLASSES,
    CIFAR10_CLASSES,
    EMOTION_CLASSES,
    STL10_CLASSES,
    load_ag_news,
    load_cifar10,
    load_digits,
    load_emotion,
    load_mnist5k,
    load_npz,
    load_stl10,
    shared_data_dir,
)
from .records import (
    Dataset,
    Splits,
    TextDataset,
    inject_label_noise,
    make_disks,
    split_off_validation,
    stratified_indices,
    stratified_split,
)

__all__ = ["AG_NEWS_CLASSES", "CIFAR10_CLASSES", "STL10_CLASSES", "EMOTION_CLASSES", "load_ag_news",
    "load_cifar10", "load_digits", "load_emotion", "load_mnist5k", "load_npz", "load_stl10",
    "shared_data_dir", "Dataset", "Splits", "TextDataset", "inject_label_noise", "make_disks",
    "split_off_validation", "stratified_indices", "stratified_split"]
