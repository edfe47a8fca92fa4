import json
from pathlib import Path

import numpy as np
import pytest

from pareto_jax import text

REF = json.loads((Path(__file__).parent / "data" / "minilm_reference.json").read_text())


@pytest.fixture(scope="module")
def encoder():
    return text.MiniLMEncoder(batch_size=8)


def test_tokenizer_matches_reference_ids(encoder):
    assert encoder.tokenize(REF["sentences"]) == REF["input_ids"]


def test_minilm_matches_reference_embeddings(encoder):
    # Reference: transformers + torch forward of the same weights (tests/data/minilm_reference.json)
    e = encoder.encode(REF["sentences"])
    ref = np.array(REF["embeddings"])
    assert e.shape == ref.shape == (7, 384)
    assert np.abs(e - ref).max() < 2e-5
    # and the similarities published for all-MiniLM-L6-v2 in the sentence-transformers README
    sim = e[:3] @ e[:3].T
    assert sim[0, 1] == pytest.approx(0.6660, abs=1e-4)
    assert sim[0, 2] == pytest.approx(0.1046, abs=1e-4)
    assert sim[1, 2] == pytest.approx(0.1411, abs=1e-4)


def test_minilm_batching_invariant(encoder):
    a = encoder.encode(REF["sentences"])
    one = np.stack([encoder.encode([s])[0] for s in REF["sentences"]])
    assert np.abs(a - one).max() < 1e-5


def test_minilm_cache_roundtrip(tmp_path, encoder):
    texts = ["cache me", "and me too"]
    a = text.minilm_embed(texts, cache_dir=tmp_path, encoder=encoder, progress=False)
    files = list((tmp_path / "minilm").glob("*.npy"))
    assert len(files) == 1
    np.save(files[0], np.full_like(a, 7.0))  # a cached value is what comes back, no recompute
    b = text.minilm_embed(texts, cache_dir=tmp_path, encoder=encoder, progress=False)
    assert np.all(b == 7.0)


def test_tfidf_fits_on_train_only():
    tr, te = text.tfidf_fit_transform(
        ["red apple", "red car", "green apple"], ["blue whale unknown words"]
    )
    assert tr.shape[0] == 3 and te.shape == (1, tr.shape[1])
    assert np.all(te == 0)  # no vocabulary leaks from the test texts
