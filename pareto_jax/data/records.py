"""Dataset records, seeded stratified splits, synthetic disks and label noise."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .. import checks


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Features (or images, samples first) with integer labels in [0, K).

    Attributes:
        x: float32 array, shape (n, ...) (flat features, or NHWC images).
        y: int32 array, shape (n,).
        class_names: one name per class; K = len(class_names).
        name: a short label used in reports.
    """

    x: np.ndarray
    y: np.ndarray
    class_names: tuple[str, ...]
    name: str = "dataset"

    def __post_init__(self):
        x = checks.as_features(self.x, f"{self.name}.x")
        object.__setattr__(self, "x", np.ascontiguousarray(x, dtype=np.float32))
        if not self.class_names:
            checks.fail("class_names", "an empty tuple", "one name per class", "pass class names")
        names = tuple(str(c) for c in self.class_names)
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            checks.fail("class_names", f"duplicate names {dup}", "one distinct name per class",
                "give every class its own name")
        if any(not n.strip() or any(ch in n for ch in "\n\r\t") for n in names):
            checks.fail("class_names", repr(names), "names without line breaks or tabs, not blank",
                "name the classes on one line each")
        object.__setattr__(self, "class_names", names)
        y = checks.as_labels(self.y, f"{self.name}.y", num_classes=len(self.class_names),
            n=x.shape[0], x_name=f"{self.name}.x")
        object.__setattr__(self, "y", y)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, idx, name: str | None = None) -> "Dataset":
        idx = np.asarray(idx)
        return Dataset(self.x[idx], self.y[idx], self.class_names, name or self.name)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=self.num_classes)


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
    """Train / validation / test splits of one dataset (validation selects, test reports)."""

    train: Dataset
    val: Dataset
    test: Dataset

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names


@dataclasses.dataclass(frozen=True, eq=False)
class TextDataset:
    """Raw texts with integer labels; turn into a `Dataset` with `pareto_jax.text`."""

    texts: tuple[str, ...]
    y: np.ndarray
    class_names: tuple[str, ...]
    name: str = "text"

    def __post_init__(self):
        object.__setattr__(self, "texts", tuple(self.texts))
        y = checks.as_labels(self.y, f"{self.name}.y", num_classes=len(self.class_names),
            n=len(self.texts), x_name=f"{self.name}.texts")
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "TextDataset":
        idx = np.asarray(idx)
        return TextDataset(
            tuple(self.texts[i] for i in idx), self.y[idx], self.class_names, self.name
        )


# ----------------------------------------------------------------------------- splitting


def stratified_indices(y: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split indices per class in the given fractions; every part keeps the class proportions.

    Each class is shuffled with a generator seeded by (seed, class), so adding a class does not
    reshuffle the others. A class with at least as many samples as parts gets at least one in each.
    """
    y = np.asarray(y)
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
        checks.fail("fractions", repr(list(fractions)), "non-negative fractions summing to 1",
            "e.g. (0.6, 0.2, 0.2)")
    parts: list[list[np.ndarray]] = [[] for _ in fr]
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng = np.random.default_rng([seed, int(c)])
        idx = idx[rng.permutation(idx.size)]
        counts = np.floor(fr * idx.size).astype(int)
        # hand out the remainder largest-fraction-first, then make sure no part is empty
        for j in np.argsort(-(fr * idx.size - counts), kind="stable")[: idx.size - counts.sum()]:
            counts[j] += 1
        if idx.size >= len(fr):
            for j in range(len(fr)):
                if counts[j] == 0 and fr[j] > 0:
                    counts[j] += 1
                    counts[np.argmax(counts)] -= 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for j in range(len(fr)):
            parts[j].append(idx[bounds[j] : bounds[j + 1]])
    return [np.sort(np.concatenate(p)) for p in parts]


def stratified_split(
    ds: Dataset, *, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """Seeded, stratified train/validation/test split of one dataset."""
    checks.check_in_range(val_fraction, "val_fraction", 0.0, 0.9)
    checks.check_in_range(test_fraction, "test_fraction", 0.0, 0.9)
    fr = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    if fr[0] <= 0:
        checks.fail("val_fraction + test_fraction", f"{val_fraction + test_fraction}", "< 1",
            "leave some data for training")
    if ds.num_classes < 2:
        checks.fail(f"{ds.name}.y", "one class",
            "at least two classes (a per-class trade-off needs two)", "check the labels")
    counts = ds.class_counts()
    need = sum(1 for f in fr if f > 0)
    if counts.min() < need:
        thin = [ds.class_names[k] for k in np.flatnonzero(counts < need)]
        checks.fail(f"{ds.name}.y",
            f"classes {thin} with fewer than {need} samples ({counts.min()})",
            f"at least {need} samples of every class (one in each of train, validation and test)",
            "drop or merge the rare classes, or gather more samples of them")
    tr, va, te = stratified_indices(ds.y, fr, seed)
    return Splits(ds.subset(tr, f"{ds.name}/train"), ds.subset(va, f"{ds.name}/val"),
        ds.subset(te, f"{ds.name}/test"))


def split_off_validation(
    train: Dataset, test: Dataset, *, val_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """For datasets shipped with a train/test split: carve a stratified validation set from "
    "train."""
    tr, va = stratified_indices(train.y, (1 - val_fraction, val_fraction), seed)
    return Splits(
        train.subset(tr, f"{train.name}/train"), train.subset(va, f"{train.name}/val"), test
    )


# ----------------------------------------------------------------------------- synthetic 2-D


def make_disks(kind: str = "separable", *, n_per_class: int = 200,
    flipped_per_class: Sequence[int] = (16, 32), seed: int = 0) -> Dataset:
    """Two uniform disks in 2-D (the synthetic experiment of docs/method.md).

    Args:
        kind: "separable" (disks of radius 1 centred at (±1.5, 0), no overlap; labels of
            `flipped_per_class[c]` samples of class c are flipped to the other class: the
            improvable case) or "overlapping" (centres at (±0.5, 0); the ceiling case).
        n_per_class: samples drawn in each disk.
        flipped_per_class: label flips per class (separable only).
        seed: generator seed.

    Returns:
        A `Dataset` with classes ("disk 0", "disk 1"); `x` has shape (2·n_per_class, 2).
    """
    checks.check_choice(kind, "kind", ("separable", "overlapping"))
    checks.check_positive(n_per_class, "n_per_class", integer=True)
    rng = np.random.default_rng(seed)
    shift = 1.5 if kind == "separable" else 0.5
    xs, ys = [], []
    for c, cx in enumerate((-shift, shift)):
        r = np.sqrt(rng.uniform(0, 1, n_per_class))
        a = rng.uniform(0, 2 * np.pi, n_per_class)
        xs.append(np.stack([cx + r * np.cos(a), r * np.sin(a)], 1))
        ys.append(np.full(n_per_class, c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if kind == "separable":
        flips = list(flipped_per_class)
        if len(flips) != 2 or any(f < 0 or f > n_per_class for f in flips):
            checks.fail("flipped_per_class", repr(flipped_per_class),
                f"two counts in [0, {n_per_class}]", "e.g. (16, 32)")
        for c, f in enumerate(flips):
            idx = rng.choice(np.flatnonzero(ys[c] == c) + c * n_per_class, size=f, replace=False)
            y[idx] = 1 - c
    return Dataset(x.astype(np.float32), y, ("disk 0", "disk 1"), f"disks-{kind}")


# ----------------------------------------------------------------------------- label noise


def inject_label_noise(
    ds: Dataset, classes: Sequence[int], fraction: float, *, seed: int = 0
) -> tuple[Dataset, np.ndarray]:
    """Flip `fraction` of the samples of each class in `classes` to a uniformly random other class.

    Used to make chosen classes deliberately weak (their decision regions shrink). Apply it to
    the training split only; validation and test stay clean.

    Returns:
        (noisy dataset, indices of the flipped samples).
    """
    checks.check_in_range(fraction, "fraction", 0.0, 1.0)
    cls = checks.as_class_indices(classes, ds.num_classes, "classes")
    rng = np.random.default_rng([seed, 7])
    y = ds.y.copy()
    flipped = []
    for c in cls:
        idx = np.flatnonzero(ds.y == c)
        sel = rng.choice(idx, size=int(round(fraction * idx.size)), replace=False)
        others = np.array([k for k in range(ds.num_classes) if k != c])
        y[sel] = rng.choice(others, size=sel.size)
        flipped.append(sel)
    flipped = np.sort(np.concatenate(flipped)) if flipped else np.zeros(0, int)
    return Dataset(ds.x, y, ds.class_names, ds.name), flipped
