"""The k smallest entries of a long vector, in JAX, without sorting it.

`smallest(key, k)` returns the same indices as ``jax.lax.top_k(-key, k)[1]`` (the k smallest
keys in increasing order, ties to the lower index), but XLA:CPU implements `top_k` by sorting
the whole vector: 0.41 s for k = 152 of N = 2^20 float64 keys, which made it the largest cost of
the exact finish at N = 1e6. Here instead:

1. a strided sample of the keys, sorted, brackets the k-th smallest key: lo with fewer than k
   keys <= lo, hi with at least k (checked by counting; widened to the whole range if the
   sample misled);
2. bisection on the keys' order-preserving integer images narrows the bracket until at most
   `cap` keys are <= hi (usually at once), or until hi is the k-th smallest key itself (many
   ties);
3. the keys <= hi (or, with many ties, those < hi and the first ties at hi still needed) are
   gathered, at most `cap` of them, and the final top_k sorts only those: 0.02-0.04 s instead
   of 0.4 s at N = 2^20 (k = 152 … 4096).

Every step is a pass over the keys or a fixed-size array, so it jits and vmaps (under vmap the
bisection loop runs until every row is done). NaN keys sort after +inf, as their bit images do.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_SAMPLE = 16384


def _ordered_bits(x):
    """An integer image of float x whose signed order is x's order (−0 just below +0)."""
    if x.dtype not in (jnp.float32, jnp.float64):
        raise TypeError(f"smallest: float32 or float64 keys, not {x.dtype}")
    it = jnp.int64 if x.dtype == jnp.float64 else jnp.int32
    b = jax.lax.bitcast_convert_type(x, it)
    return jnp.where(b < 0, b ^ jnp.iinfo(it).max, b)


def _midpoint(lo, hi):
    return (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without overflow


def default_cap(k: int) -> int:
    return 4 * k + 1024


def smallest(key, k: int, *, cap: int | None = None):
    """Indices of the k smallest entries of the 1-D float array `key`, in increasing key order,
    ties to the lower index: ``jax.lax.top_k(-key, k)[1]`` (module docstring). `k` and `cap`
    (how many candidates the last step sorts, >= k) are static; short keys use top_k itself."""
    n = key.shape[0]
    cap = default_cap(k) if cap is None else cap
    if k > n or cap < k:
        raise ValueError(f"smallest: need k <= len(key) and cap >= k (k={k}, n={n}, cap={cap})")
    # short keys: top_k. (A bisection from the whole range was 7x faster for 32 vmapped rows of
    # 3072 keys, but it added 1.5-2 s to the compile of every program with such N)
    if n <= 4 * cap:
        return jax.lax.top_k(-key, k)[1]
    ik = _ordered_bits(key)
    it = ik.dtype

    def count(t):
        return jnp.sum(ik <= t)

    # 1. a bracket from a strided sample: about 3k keys expected <= hi and k/3 <= lo
    s = min(n, _SAMPLE)
    sample = jnp.sort(ik[(jnp.arange(s) * (n // s))])
    r_hi = min(s - 1, -(-3 * k * s // n))
    r_lo = k * s // (3 * n) - 1
    hi = sample[r_hi]
    c_hi = count(hi)
    top = jnp.max(ik)
    hi, c_hi = jnp.where(c_hi >= k, hi, top), jnp.where(c_hi >= k, c_hi, n)
    # nothing is <= bottom (only a negative NaN with every payload bit set has the type's minimum
    # as its image; the callers' keys are never NaN)
    bottom = jnp.min(ik) - 1
    if r_lo >= 0:
        lo = sample[r_lo]
        lo = jnp.where(count(lo) < k, lo, bottom)
    else:
        lo = bottom

    # 2. bisection while too many keys are <= hi and the bracket can still narrow (lo + 1 < hi,
    # not hi − lo > 1: a bracket of keys of both signs can span more than the type's range)
    def cond(st):
        lo, hi, c_hi = st
        return (c_hi > cap) & (lo + 1 < hi)

    def body(st):
        lo, hi, c_hi = st
        mid = _midpoint(lo, hi)
        c = count(mid)
        return jnp.where(c >= k, lo, mid), jnp.where(c >= k, mid, hi), jnp.where(c >= k, c, c_hi)

    lo, hi, c_hi = jax.lax.while_loop(cond, body, (lo.astype(it), hi.astype(it), c_hi))

    # 3. every key <= hi when at most cap of them (the usual case), else (many ties at hi,
    # which is then the k-th smallest key, fewer than k keys below it) every key < hi and the
    # first ties at hi still needed
    def with_ties(_):
        below, tie = ik < hi, ik == hi
        return below | (tie & (jnp.cumsum(tie) <= k - jnp.sum(below)))

    take = jax.lax.cond(c_hi <= cap, lambda _: ik <= hi, with_ties, None)
    cand = jnp.nonzero(take, size=cap, fill_value=n)[0]
    ck = jnp.where(cand < n, ~ik[jnp.minimum(cand, n - 1)], jnp.iinfo(it).min)  # ~x: decreasing
    _, pos = jax.lax.top_k(ck, k)
    return cand[pos]
