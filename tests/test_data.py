import csv
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from pareto_jax import data, datasets
from pareto_jax.checks import InputError


def test_stratified_split_is_stratified_and_reproducible(digits_splits):
    ds = data.load_digits()
    a = data.stratified_split(ds, seed=3)
    b = data.stratified_split(ds, seed=3)
    c = data.stratified_split(ds, seed=4)
    assert np.array_equal(a.train.x, b.train.x) and np.array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.train.x, c.train.x)
    total = ds.class_counts()
    for part, frac in ((a.train, 0.6), (a.val, 0.2), (a.test, 0.2)):
        counts = part.class_counts()
        assert np.all(np.abs(counts - frac * total) <= 1.0 + 1e-9)
    # disjoint and complete: every image lands in exactly one split
    allx = np.concatenate([a.train.x, a.val.x, a.test.x])
    assert allx.shape[0] == len(ds)
    assert len({r.tobytes() for r in allx}) == len({r.tobytes() for r in ds.x})


def test_stratified_indices_small_class_gets_every_part():
    y = np.array([0] * 50 + [1] * 3)
    parts = data.stratified_indices(y, (0.6, 0.2, 0.2), seed=0)
    for p in parts:
        assert (y[p] == 1).sum() >= 1
    assert sorted(np.concatenate(parts).tolist()) == list(range(53))


def test_disks_cases():
    sep = data.make_disks("separable", n_per_class=100, flipped_per_class=(8, 16), seed=1)
    # true cluster = sign of x coordinate; flipped labels disagree with it
    true = (sep.x[:, 0] > 0).astype(int)
    assert (true != sep.y).sum() == 24
    assert ((true == 0) & (sep.y == 1)).sum() == 8
    ov = data.make_disks("overlapping", n_per_class=100, seed=1)
    assert np.abs(ov.x[:, 0]).min() < 0.5  # the disks overlap
    assert np.array_equal(ov.x, data.make_disks("overlapping", n_per_class=100, seed=1).x)


def test_bundled_vision_sets():
    d = data.load_digits()
    assert d.x.shape == (1797, 64) and d.num_classes == 10 and 0 <= d.x.min() and d.x.max() <= 1
    m = data.load_mnist5k()
    assert m.x.shape == (5000, 784) and np.all(m.class_counts() == 500) and m.x.max() <= 1


def _write_cifar(root, n_per_batch=7, batches=2, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for i in range(1, batches + 1):
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = list(rng.integers(0, 10, n_per_batch))
        with open(root / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x, b"labels": y, b"batch_label": b"x"}, f)
        truth[i] = (x, y)
    xt = rng.integers(0, 256, (5, 3072), dtype=np.uint8)
    with open(root / "test_batch", "wb") as f:
        pickle.dump({b"data": xt, b"labels": [0, 1, 2, 3, 4]}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in data.CIFAR10_CLASSES]}, f)
    return truth, xt


def test_cifar10_loader(tmp_path):
    truth, xt = _write_cifar(tmp_path / "cifar-10-batches-py")
    tr = data.load_cifar10(tmp_path / "cifar-10-batches-py", "train")
    te = data.load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert tr.x.shape == (14, 32, 32, 3) and te.x.shape == (5, 32, 32, 3)
    x0 = truth[1][0][0]
    # red channel first 1024 bytes, row-major 32x32
    assert tr.x[0, 0, 1, 0] == pytest.approx(x0[1] / 255)
    assert tr.x[0, 2, 0, 1] == pytest.approx(x0[1024 + 64] / 255)
    assert tr.class_names[0] == "airplane"
    assert list(tr.y[:7]) == list(truth[1][1])
    with pytest.raises(InputError, match="path"):
        data.load_cifar10(tmp_path / "nope")


def test_stl10_loader(tmp_path):
    rng = np.random.default_rng(0)
    n = 3
    img = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)  # (n, row, col, ch)
    # standard file: per image, per channel, column-major 96x96
    raw = img.transpose(0, 3, 2, 1).reshape(-1)
    raw.tofile(tmp_path / "train_X.bin")
    np.array([1, 10, 5], np.uint8).tofile(tmp_path / "train_y.bin")
    ds = data.load_stl10(tmp_path, "train")
    assert ds.x.shape == (3, 96, 96, 3)
    assert np.allclose(ds.x * 255, img)
    assert list(ds.y) == [0, 9, 4] and ds.class_names[9] == "truck"
    (tmp_path / "train_X.bin").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="multiple"):
        data.load_stl10(tmp_path, "train")


def test_ag_news_with_and_without_header(tmp_path):
    rows = [["3", "Title one", "Desc, with comma"], ["1", "Another", "x\\y"]]
    for header in (True, False):
        f = tmp_path / f"ag{header}.csv"
        with open(f, "w", newline="") as fh:
            w = csv.writer(fh)
            if header:
                w.writerow(["label", "title", "description"])
            w.writerows(rows)
        ds = data.load_ag_news(f)
        assert list(ds.y) == [2, 0]
        assert ds.texts[0] == "Title one Desc, with comma"
    f = tmp_path / "bad.csv"
    f.write_text("7,a,b\n")
    with pytest.raises(InputError, match="labels 1..4"):
        data.load_ag_news(f)


def test_emotion_formats(tmp_path):
    (tmp_path / "train.txt").write_text("text;label_name\ni feel; odd today;joy\nso sad;sadness\n")
    ds = data.load_emotion(tmp_path, "train")
    assert ds.texts == ("i feel; odd today", "so sad") and list(ds.y) == [1, 0]
    (tmp_path / "t.csv").write_text('text,label\n"hi, there",3\nyo,surprise\n')
    ds = data.load_emotion(tmp_path / "t.csv")
    assert ds.texts == ("hi, there", "yo") and list(ds.y) == [3, 5]
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"text": "a", "label": 4})
        + "\n"
        + json.dumps({"text": "b", "label": "love"})
        + "\n"
    )
    ds = data.load_emotion(tmp_path / "t.jsonl")
    assert list(ds.y) == [4, 2]
    (tmp_path / "bad.txt").write_text("hello;grumpy\n")
    with pytest.raises(InputError, match="grumpy"):
        data.load_emotion(tmp_path / "bad.txt")


EXCERPTS = Path(__file__).parent / "data"


def test_shipped_text_excerpts_load():
    """The excerpts in tests/data (what the default suite reads on a bare clone): the loaders'
    header handling, labels and class names on real text."""
    ag = data.load_ag_news(EXCERPTS / "ag_news_excerpt.csv")
    assert (
        len(ag) == 240
        and np.all(np.bincount(ag.y) == 60)
        and ag.class_names == data.AG_NEWS_CLASSES
    )
    assert all(isinstance(t, str) and t for t in ag.texts)
    tr = data.load_emotion(EXCERPTS / "emotion_excerpt", "train")
    va = data.load_emotion(EXCERPTS / "emotion_excerpt", "val")
    assert len(tr) == 180 and len(va) == 60 and np.all(np.bincount(tr.y, minlength=6) == 30)
    assert tr.class_names == data.EMOTION_CLASSES


@pytest.mark.slow  # the full corpora ($PARETO_JAX_DATA or ../shared/data): not in a bare clone
def test_shared_text_corpora_load():
    root = data.shared_data_dir()
    ag = data.load_ag_news(root / "ag_news" / "test.csv")
    assert len(ag) == 7600 and np.all(np.bincount(ag.y) == 1900)
    tr = data.load_emotion(root / "emotion", "train")
    va = data.load_emotion(root / "emotion", "val")
    assert len(tr) == 16000 and len(va) == 2000
    counts = np.bincount(tr.y, minlength=6)
    assert counts.argmax() == 1 and counts.argmin() == 5  # joy most common, surprise rarest


@pytest.mark.parametrize(
    "bad, match",
    [(dict(y=np.array([0, 1, 5])), "label 5"), (dict(y=np.array([0, -1, 1])), "label -1"),
        (dict(x=np.array([[0.0], [np.nan], [1.0]])), "non-finite"),
        (dict(y=np.array([0, 1])), "3 labels"), (dict(y=np.array([[0], [1], [1]])), "1-D"),
        (dict(x=np.array(["a", "b", "c"])), "numeric")],
)
def test_dataset_bad_input_names_argument(bad, match):
    kw = dict(x=np.zeros((3, 1)), y=np.array([0, 1, 1]))
    kw.update(bad)
    with pytest.raises(InputError, match=match) as e:
        data.Dataset(kw["x"], kw["y"], ("a", "b"), "toy")
    assert "toy." in str(e.value) and "Fix:" in str(e.value)


def test_load_splits_registry():
    s = datasets.load_splits("disks-separable", seed=0)
    assert s.num_classes == 2 and len(s.train) + len(s.val) + len(s.test) == 400
    with pytest.raises(InputError, match="dataset"):
        datasets.load_splits("imagenet")
    with pytest.raises(InputError, match="path"):
        datasets.load_splits("cifar10")


def test_text_tfidf_splits_from_the_shipped_excerpt():
    s = datasets.load_splits("ag_news", path=str(EXCERPTS / "ag_news_excerpt.csv"),
        features="tfidf", max_train=80, seed=0)
    assert s.train.x.shape[0] == 80 and s.val.x.shape[1] == s.train.x.shape[1]
    assert np.all(s.train.class_counts() == 20)
    e = datasets.load_splits(
        "emotion", path=str(EXCERPTS / "emotion_excerpt"), features="tfidf", seed=0
    )
    assert (len(e.train), len(e.val), len(e.test)) == (180, 60, 60)


@pytest.mark.slow  # the full corpus
def test_text_tfidf_splits_from_shared_data():
    s = datasets.load_splits("ag_news", features="tfidf", max_train=400, seed=0)
    assert s.train.x.shape[0] == 400 and s.val.x.shape[1] == s.train.x.shape[1]
    assert np.all(s.train.class_counts() == 100)


def test_ag_news_minilm_split_equals_embedding_each_split(tmp_path):
    """The MiniLM path embeds the whole file once and indexes it; that must be what embedding
    each split's texts separately (the TF-IDF path's structure) gives, subsample included."""
    from pareto_jax import text

    rng = np.random.default_rng(0)
    words = ["market", "team", "season", "chip", "bank", "election", "goal", "software", "shares",
        "war"]
    rows = [
        f'{i % 4 + 1},"{" ".join(rng.choice(words, 4))}","{" ".join(rng.choice(words, 7))}"'
        for i in range(48)
    ]
    f = tmp_path / "ag.csv"
    f.write_text("\n".join(rows) + "\n")
    cache = str(tmp_path / "cache")
    got = datasets.load_splits(
        "ag_news", path=str(f), features="minilm", cache_dir=cache, seed=3, max_train=20
    )
    full = data.load_ag_news(f)
    i_tr, i_va, i_te = data.stratified_indices(full.y, (0.6, 0.2, 0.2), 3)
    keep, _ = data.stratified_indices(full.y[i_tr], (20 / len(i_tr), 1 - 20 / len(i_tr)), 3)
    ref = text.featurize_splits(full.subset(i_tr[keep]), full.subset(i_va), full.subset(i_te),
        method="minilm", cache_dir=str(tmp_path / "cache2"), name="ag_news")
    for a, b in ((got.train, ref.train), (got.val, ref.val), (got.test, ref.test)):
        assert a.name == b.name and np.array_equal(a.y, b.y)
        np.testing.assert_allclose(a.x, b.x, rtol=1e-4, atol=1e-5)
