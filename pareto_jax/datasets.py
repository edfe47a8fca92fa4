"""Datasets by name: the registry that the CLI, the pipeline and the experiments load from.

The records, loaders and splitting live in `pareto_jax.data`; text corpora are featurised by
`pareto_jax.text` (TF-IDF or MiniLM embeddings). This module only joins them.
"""

from __future__ import annotations

from pathlib import Path

from . import checks, data, text
from .config import DATASETS


def _subsample(splits: data.Splits, max_train: int | None, seed: int) -> data.Splits:
    if max_train is None or len(splits.train) <= max_train:
        return splits
    K = splits.num_classes
    if max_train < 2 * K:
        checks.fail("max_train", str(max_train),
            f"at least {2 * K} (two training samples of each of the {K} classes)",
            f"raise --max-train to {2 * K} or more, or drop it")
    keep, _ = data.stratified_indices(
        splits.train.y, (max_train / len(splits.train), 1 - max_train / len(splits.train)), seed
    )
    return data.Splits(splits.train.subset(keep), splits.val, splits.test)


def load_splits(name: str = "digits", *, seed: int = 0, path: str | None = None,
    features: str = "tfidf", max_train: int | None = None, cache_dir: str | None = None,
    val_fraction: float = 0.2, test_fraction: float = 0.2) -> data.Splits:
    """Load a dataset by name and split it (stratified, seeded).

    Args:
        name: one of `DATASETS`. "digits" is the embedded default.
        seed: split seed (and disks generator seed).
        path: file/folder for datasets the user supplies (cifar10, stl10; emotion/ag_news default
            to the shared data folder).
        features: for text corpora, "tfidf" or "minilm" (sentence embeddings, cached on disk).
        max_train: keep at most this many training samples (stratified).
        cache_dir: where MiniLM embeddings are cached.
    """
    checks.check_choice(name, "dataset", DATASETS)
    if name == "digits":
        s = data.stratified_split(
            data.load_digits(), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    elif name == "mnist5k":
        s = data.stratified_split(
            data.load_mnist5k(), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed
        )
    elif name.startswith("disks"):
        ds = data.make_disks(name.split("-", 1)[1], seed=seed)
        s = data.stratified_split(ds, val_fraction=0.25, test_fraction=0.25, seed=seed)
    elif name == "npz":
        if path is None:
            checks.fail("path", "None", "the .npz file of your features and labels",
                "pass --path FILE.npz (arrays x, y; see data.load_npz)")
        s = data.load_npz(path, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    elif name in ("cifar10", "stl10"):
        if path is None:
            checks.fail("path", "None", f"the folder holding the {name} files",
                f"pass --path /path/to/{name} files (nothing is downloaded)")
        loader = data.load_cifar10 if name == "cifar10" else data.load_stl10
        s = data.split_off_validation(
            loader(path, "train"), loader(path, "test"), val_fraction=val_fraction, seed=seed
        )
    else:
        root = Path(path) if path else data.shared_data_dir() / name
        if name == "emotion":
            tr, va, te = (data.load_emotion(root, s_) for s_ in ("train", "val", "test"))
        else:
            f = root if root.is_file() else root / "test.csv"
            full = data.load_ag_news(f)
            i_tr, i_va, i_te = data.stratified_indices(
                full.y, (1 - val_fraction - test_fraction, val_fraction, test_fraction), seed
            )
            if features == "minilm":
                # embeddings need no fitting: embed the whole file once (one cache entry for
                # every seed's split) and index it
                x = text.minilm_embed(full.texts, cache_dir=cache_dir)
                if max_train is not None and len(i_tr) > max_train:
                    keep, _ = data.stratified_indices(
                        full.y[i_tr], (max_train / len(i_tr), 1 - max_train / len(i_tr)), seed
                    )
                    i_tr = i_tr[keep]
                return data.Splits(
                    *(
                        data.Dataset(x[i], full.y[i], full.class_names, f"{name}-minilm/{part}")
                        for i, part in ((i_tr, "train"), (i_va, "val"), (i_te, "test"))
                    )
                )
            tr, va, te = full.subset(i_tr), full.subset(i_va), full.subset(i_te)
        if max_train is not None and len(tr) > max_train:
            keep, _ = data.stratified_indices(
                tr.y, (max_train / len(tr), 1 - max_train / len(tr)), seed
            )
            tr = tr.subset(keep)
        s = text.featurize_splits(tr, va, te, method=features, cache_dir=cache_dir, name=name)
    return _subsample(s, max_train, seed)
