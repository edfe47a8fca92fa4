"""K-FAC / EK-FAC on the layers users have (`pareto_jax.kfac.layers`): nnx.LinearGeneral
(attention's projections), nnx.Embed, Linear on sequences, with LayerNorm held fixed.

Exact where the factorisation is the same matrix written another way (a LinearGeneral against
the equivalent nnx.Linear; an embedding against a bias-free Linear on one-hot inputs), EK-FAC's
embedding moments against per-sample gradients formed one by one, and where it is an
approximation (a small transformer classifier) against the exact Gauss-Newton solve on the
selected parameters, with the identity curvature as the bar to clear, at a trained, confident
model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _problems import subspace_P
from flax import nnx
from jax.flatten_util import ravel_pytree

from pareto_jax import InputError, kfac, models, train
from pareto_jax.influence import Influence, InfluenceConfig

WD, DAMP, V, T, D, K = 1e-3, 1e-3, 12, 6, 8, 3


def _tokens(n=96, seed=0):
    """Token sequences whose class is which of three marker tokens occurs most (ties to the
    lowest), with the markers planted at random positions among filler tokens."""
    rng = np.random.default_rng(seed)
    x = rng.integers(3, V, size=(n, T))
    y = rng.integers(0, K, size=n)
    for i in range(n):
        pos = rng.permutation(T)[: 2 + i % 2]
        x[i, pos[:2]] = y[i]
        if len(pos) > 2:
            x[i, pos[2]] = (y[i] + 1) % K
    return x.astype(np.int32), y.astype(np.int32)


class TinyTransformer(nnx.Module):
    """Embed -> self-attention (LinearGeneral projections) + residual -> LayerNorm -> per-token
    Linear (tanh) -> mean over tokens -> Linear head."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, dtype=jnp.float64, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=D, qkv_features=D,
            decode=False, rngs=rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.ff = nnx.Linear(D, D, rngs=rngs)
        self.head = nnx.Linear(D, K, rngs=rngs)

    def __call__(self, x):
        h = self.embed(x)
        h = self.norm(h + self.attn(h))
        return self.head(jnp.tanh(self.ff(h)).mean(1))


def _trained(model, x, y, dtype=jnp.float64, epochs=80):
    apply, params = models.functional(model)
    params = jax.tree_util.tree_map(lambda p: jnp.asarray(p, dtype), params)
    loss = models.per_sample_loss(apply)
    params = train.train(loss, params, x, y, train.TrainConfig(epochs=epochs, batch_size=32,
        learning_rate=0.01, weight_decay=WD)).params
    p = jax.nn.softmax(apply(params, jax.tree_util.tree_map(jnp.asarray, x)))
    assert float(jnp.mean(jnp.max(p, -1))) > 0.85  # confident, far from uniform
    return apply, params, loss


def _P(model, apply, params, loss, x, y, solver, **kw):
    cfg = InfluenceConfig(solver=solver, damping=DAMP)
    return Influence(loss, params, x, y, num_classes=K, weight_decay=WD, apply=apply, model=model,
        config=cfg, **kw).influence(x, y)


@pytest.fixture(scope="module")
def transformer():
    with jax.enable_x64(True):
        x, y = _tokens()
        m = TinyTransformer(nnx.Rngs(0))
        apply, params, loss = _trained(m, x, y)
        return m, apply, params, loss, x, y


def _weight_matrix(layer, p):
    """The layer's (in (+1), out) matrix written here from its parameter dict."""
    if layer.kind == "embed":
        return p["embedding"]
    W = p["kernel"].reshape(layer.in_features, layer.out_features)
    return jnp.concatenate([W, p["bias"].reshape(1, -1)]) if layer.has_bias else W


@pytest.mark.parametrize("out", [None, "weighted_tempered"])
def test_ekfac_moments_of_every_transformer_layer_equal_the_per_sample_gradients(x64, transformer,
    tmp_path, out):
    """For each factored layer (the embedding, the four LinearGeneral projections of attention,
    the per-token Linear and the head): EK-FAC's corrected eigenvalues are the mean over samples
    of Σ_c (Q_Aᵀ G_ic Q_S)², with G_ic the layer's gradient of the logits' pseudo-loss r_icᵀ z_i
    formed by autodiff for each sample (its positions summed by the chain rule). For the
    cross-entropy and for an output loss whose output Hessian depends on the label
    (`_weighted_tempered`), r_ic the columns of its root."""
    m, apply, params, loss, x, y = transformer
    out = None if out is None else _weighted_tempered
    select = {k for k in kfac.param_keys(params) if k[0] != "norm"}
    f = kfac.compute_factors(m, params, x, num_classes=K, weight_decay=WD, batch_size=40,
        select=select, y=y, output_loss=out)
    assert sorted(l.kind for l in f.layers) == ["dense"] * 2 + ["embed"] + ["general"] * 4
    kfac.save_factors(tmp_path / "f.npz", f)  # the layers' kinds and axes survive a round trip
    back = kfac.load_factors(tmp_path / "f.npz")
    assert back.layers == f.layers and back.layout == f.layout
    b = np.random.default_rng(0).normal(size=(2, f.num_params))
    np.testing.assert_array_equal(kfac.apply_inverse(back, b, damping=DAMP),
        kfac.apply_inverse(f, b, damping=DAMP))
    z = apply(params, x)
    if out is None:
        p = jax.nn.softmax(z)
        R = jnp.sqrt(p)[:, None, :] * (p[:, :, None] - jnp.eye(K)[None])  # diag p − ppᵀ = R Rᵀ
    else:  # the loss's own output Hessian (PSD here), written as its symmetric square root
        lam, Q = jnp.linalg.eigh(jax.vmap(jax.hessian(out))(z, jnp.asarray(y)))
        R = Q * jnp.sqrt(jnp.clip(lam, 0))[:, None, :]

    def at(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    def put(tree, path, value):
        if not path:
            return value
        return {**tree, path[0]: put(tree[path[0]], path[1:], value)}

    for layer, lf in zip(f.layers, f.factors):
        p0 = at(params, layer.path)

        def pseudo(p, xi, r):  # r_cᵀ z(x_i) as a function of this layer's parameters
            return apply(put(params, layer.path, p), xi[None])[0] @ r

        def grads(xi, Ri):
            return jax.vmap(lambda r: _weight_matrix(layer, jax.grad(pseudo)(p0, xi, r)))(Ri.T)

        G = jax.vmap(grads)(jnp.asarray(x), R)  # (N, K, in (+1), out)
        rot = G if layer.kind == "embed" else jnp.einsum("ai,ncij->ncaj", lf.QA.T, G)
        ref = np.asarray(jnp.mean(jnp.sum(jnp.einsum("ncaj,jb->ncab", rot, lf.QG) ** 2, 1), 0))
        np.testing.assert_allclose(lf.lam_ekfac, ref, rtol=1e-6, atol=1e-10 * ref.max(),
            err_msg=str(layer.path))


def _gauss_newton(apply, params, keys, x, y, out=None):
    """(g (N, P), class gradients (K, P), the Gauss-Newton matrix (P, P), each parameter's layer)
    on the arrays `keys`, the rest closed over; for the cross-entropy or the output loss
    ``out(logits, y)`` (its Hessian in the logits by autodiff)."""
    sel = {k: params[k] for k in keys}
    flat, unravel = ravel_pytree(sel)

    def logits(t, xi):
        return apply({**params, **unravel(t)}, xi[None])[0]

    def ce(t, xi, yi):
        z = logits(t, xi)
        return jax.nn.logsumexp(z) - z[yi] if out is None else out(z, yi)

    xs, ys = jnp.asarray(x), jnp.asarray(y)
    J = jax.vmap(lambda xi: jax.jacrev(logits)(flat, xi))(xs)
    z = apply(params, xs)
    p = jax.nn.softmax(z)
    Hout = (jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :] if out is None
        else jax.vmap(jax.hessian(out))(z, ys))
    H = jnp.einsum("nkp,nkl,nlq->pq", J, Hout, J) / len(y)
    g = jax.vmap(jax.grad(ce), (None, 0, 0))(flat, xs, ys)
    gk = jnp.stack([g[ys == k].mean(0) for k in range(K)])
    paths = [kp[:-1] for kp, _ in jax.tree_util.tree_flatten_with_path(sel)[0]]
    layer = np.concatenate([np.full(np.size(a), i) for i, a in
        enumerate(jax.tree_util.tree_leaves(sel))])
    first = {pth: i for i, pth in reversed(list(enumerate(paths)))}
    layer = np.array([first[paths[i]] for i in layer])
    return g, gk, H, layer


def test_transformer_kfac_and_ekfac_against_the_exact_gauss_newton_solve(x64, transformer):
    """Every factored layer selected by default, LayerNorm held fixed and said so. Against the
    exact Gauss-Newton solve on the layers' block diagonal (what K-FAC approximates block by block)
    and on the whole selected subspace (the cross-layer blocks too), per class: correlation above
    the identity curvature's; EK-FAC within 35 % of the block-diagonal solve."""
    m, apply, params, loss, x, y = transformer
    keys = ["embed", "attn", "ff", "head"]
    g, gk, H, layer = _gauss_newton(apply, params, keys, x, y)
    eye = (WD + DAMP) * jnp.eye(H.shape[0])
    full = np.asarray(g @ jnp.linalg.solve(H + eye, gk.T) / len(y))
    block = np.asarray(g @ jnp.linalg.solve(
        jnp.where(layer[:, None] == layer[None, :], H, 0) + eye, gk.T) / len(y))
    trivial = np.asarray(g @ gk.T / len(y))
    ref, _ = subspace_P(apply, params, keys, x, y, K, weight_decay=WD, damping=DAMP)
    np.testing.assert_allclose(full, ref, rtol=1e-8, atol=1e-12)  # two references agree

    def corr(a, b):
        return np.array([np.corrcoef(a[:, k], b[:, k])[0, 1] for k in range(K)])

    def err(a, b):
        return np.linalg.norm(a - b, axis=0) / np.linalg.norm(b, axis=0)

    for solver in ("ekfac", "kfac"):
        res = _P(m, apply, params, loss, x, y, solver)
        note = res.details["selection"]
        assert "norm/scale" in note and "norm/bias" in note and "attn" not in note, note
        P = np.asarray(res.P)
        # (measured: EK-FAC 0.990-0.993 with block, 0.964-0.981 with full; K-FAC
        # 0.92-0.95 with full; the identity 0.86-0.90 with full)
        assert np.all(corr(P, full) > corr(trivial, full) + 0.02), (solver, corr(P, full))
        if solver == "ekfac":
            assert np.all(corr(P, block) > 0.98) and np.all(err(P, block) < 0.35), err(P, block)


def _weighted_tempered(z, y):
    """Class-weighted cross-entropy at temperature 2: its output Hessian,
    w_y/4 · (diag p − ppᵀ) at p = softmax(z/2), depends on the label."""
    return jnp.array([1.0, 2.0, 0.5])[y] * (jax.nn.logsumexp(z / 2) - z[y] / 2)


def test_transformer_ekfac_with_another_output_loss(x64, transformer):
    """The transformer with an output loss that is not the cross-entropy (`_weighted_tempered`,
    as a `models.OutputLoss`): EK-FAC and K-FAC against the exact Gauss-Newton solve with that
    loss's own output Hessian, per class: correlation above the identity curvature's."""
    m, apply, params, _, x, y = transformer
    g, gk, H, _ = _gauss_newton(apply, params, ["embed", "attn", "ff", "head"], x, y,
        _weighted_tempered)
    full = np.asarray(g @ jnp.linalg.solve(H + (WD + DAMP) * jnp.eye(H.shape[0]), gk.T) / len(y))
    trivial = np.asarray(g @ gk.T / len(y))

    def corr(a):
        return np.array([np.corrcoef(a[:, k], full[:, k])[0, 1] for k in range(K)])

    loss = models.OutputLoss(apply, _weighted_tempered)
    # (measured per class: EK-FAC 0.959 / 0.982 / 0.967, K-FAC 0.908 / 0.964 / 0.912, the
    # identity 0.857 / 0.942 / 0.663)
    for solver, margin in (("ekfac", 0.03), ("kfac", 0.01)):
        res = _P(m, apply, params, loss, x, y, solver)
        assert "own output Hessian" in res.details["curvature_note"]
        assert np.all(corr(np.asarray(res.P)) > corr(trivial) + margin), (solver, corr(res.P))


def test_auto_damping_is_read_exactly_off_the_factors(x64, transformer):
    """For K-FAC / EK-FAC, "auto" is 1e-4 of the mean eigenvalue of G_SS + λI with the trace
    read off EK-FAC's moments (no probes): equal to the dense Gauss-Newton matrix's trace."""
    m, apply, params, loss, x, y = transformer
    _, _, H, _ = _gauss_newton(apply, params, ["embed", "attn", "ff", "head"], x, y)
    expected = 1e-4 * (float(jnp.trace(H)) / H.shape[0] + WD)
    for solver in ("ekfac", "kfac"):
        fit = Influence(loss, params, x, y, num_classes=K, weight_decay=WD, apply=apply, model=m,
            config=InfluenceConfig(solver=solver))
        assert fit.damping == pytest.approx(expected, rel=1e-9)


class Projection(nnx.Module):
    """x (B, C, L) -> LinearGeneral contracting axis 1 (C = 4) into (2, 3) features at each of
    the L positions -> tanh -> mean over positions -> Linear head; or the same with a plain
    nnx.Linear on the transposed input (`plain`)."""

    def __init__(self, rngs, plain=False):
        self.plain = plain
        self.proj = (nnx.Linear(4, 6, rngs=rngs) if plain
            else nnx.LinearGeneral(4, (2, 3), axis=1, rngs=rngs))
        self.head = nnx.Linear(6, K, rngs=rngs)

    def __call__(self, x):
        if self.plain:
            h = self.proj(jnp.swapaxes(x, 1, 2))
        else:
            h = self.proj(x).reshape(x.shape[0], x.shape[2], 6)
        return self.head(jnp.tanh(h).mean(1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_linear_general_is_factored_as_the_linear_it_reshapes(x64, dtype):
    """A LinearGeneral contracting a middle axis, against the nnx.Linear with its kernel
    reshaped (the same network): the same K-FAC and EK-FAC P, in float32 and float64."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 4, 5)).astype(np.float32)
    y = np.arange(90, dtype=np.int32) % K
    x[np.arange(90), y] += 1.5  # class k: channel k raised at every position
    gen = Projection(nnx.Rngs(0))
    apply, params, loss = _trained(gen, x, y, dtype, epochs=60)
    plain = Projection(nnx.Rngs(0), plain=True)
    papply, pparams = models.functional(plain)
    pparams = {"head": params["head"], "proj": {"kernel": params["proj"]["kernel"].reshape(4, 6),
        "bias": params["proj"]["bias"].reshape(6)}}
    np.testing.assert_allclose(papply(pparams, x), apply(params, x), rtol=1e-5, atol=1e-6)
    ploss = models.per_sample_loss(papply)
    tol = 2e-4 if dtype == jnp.float32 else 1e-9
    for solver in ("ekfac", "kfac"):
        a = _P(gen, apply, params, loss, x, y, solver).P
        b = _P(plain, papply, pparams, ploss, x, y, solver).P
        assert a.dtype == dtype
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max())


class Grid(nnx.Module):
    """x (B, 3, 4, 5) -> LinearGeneral contracting axes 1 and 2 (given in `axis` order) into 6
    features at each of 5 positions -> tanh -> mean -> head."""

    def __init__(self, rngs, axis):
        self.proj = nnx.LinearGeneral((3, 4), 6, axis=axis, rngs=rngs)
        self.head = nnx.Linear(6, K, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.proj(x)).mean(1))


def test_linear_general_contracting_axes_given_in_any_order(x64):
    """flax pairs `in_features` with the contracted axes in increasing order whatever the order
    of `axis`: axis=(2, 1) is the same layer as (1, 2), and both are the nnx.Linear on the input
    reshaped to (B, 5, 12); their K-FAC / EK-FAC P are equal."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(90, 3, 4, 5))
    y = np.arange(90, dtype=np.int32) % K
    x[np.arange(90), y] += 1.0
    a = Grid(nnx.Rngs(0), (1, 2))
    apply, params, loss = _trained(a, x, y, epochs=40)
    b = Grid(nnx.Rngs(0), (2, 1))
    bapply, _ = models.functional(b)
    np.testing.assert_allclose(bapply(params, x), apply(params, x), rtol=1e-12)
    for solver in ("ekfac", "kfac"):
        pa = _P(a, apply, params, loss, x, y, solver).P
        pb = _P(b, bapply, params, models.per_sample_loss(bapply), x, y, solver).P
        np.testing.assert_allclose(pb, pa, rtol=1e-9, atol=1e-12 * np.abs(pa).max())


class Bag(nnx.Module):
    """Tokens -> Embed (no bias) -> tanh -> mean -> head; or one-hot tokens -> bias-free Linear."""

    def __init__(self, rngs, onehot=False):
        self.onehot = onehot
        self.emb = (nnx.Linear(V, D, use_bias=False, rngs=rngs) if onehot
            else nnx.Embed(V, D, dtype=jnp.float64, rngs=rngs))
        self.head = nnx.Linear(D, K, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.emb(x)).mean(1))


def test_an_embedding_is_factored_as_a_linear_on_one_hot_tokens(x64):
    """K-FAC: the embedding's diagonal input factor (token frequencies) gives the same P as the
    bias-free Linear on one-hot tokens, whose A is that diagonal formed densely. EK-FAC: the
    corrected eigenvalues equal Σ_c (G_ic Q_S)² averaged over samples, from each sample's
    embedding gradient G_ic formed by autodiff (the repeated tokens of a sample summed first)."""
    x, y = _tokens(seed=2)
    assert any(len(set(r)) < T for r in x)  # samples repeat tokens
    m = Bag(nnx.Rngs(0))
    apply, params, loss = _trained(m, x, y)
    oh = Bag(nnx.Rngs(0), onehot=True)
    oapply, _ = models.functional(oh)
    oparams = {"head": params["head"], "emb": {"kernel": params["emb"]["embedding"]}}
    xo = np.asarray(jax.nn.one_hot(x, V), np.float64)
    np.testing.assert_allclose(oapply(oparams, xo), apply(params, x), rtol=1e-12)
    a = _P(m, apply, params, loss, x, y, "kfac").P
    b = _P(oh, oapply, oparams, models.per_sample_loss(oapply), xo, y, "kfac").P
    np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-9 * np.abs(b).max())

    f = kfac.compute_factors(m, params, x, num_classes=K, weight_decay=WD)
    i = [l.kind for l in f.layers].index("embed")
    QG = np.asarray(f.factors[i].QG)
    R = kfac.output_root(apply(params, x), y)  # (N, K, K): H_out = R Rᵀ

    def logits(emb, xi):
        return apply({**params, "emb": {"embedding": emb}}, xi[None])[0]

    J = jax.vmap(lambda xi: jax.jacrev(logits)(params["emb"]["embedding"], xi))(x)  # (N,K,V,D)
    G = jnp.einsum("nkvd,nkc->ncvd", J, R)  # class c's pseudo-gradient of the embedding
    ref = np.asarray(jnp.mean(jnp.sum(jnp.einsum("ncvd,de->ncve", G, QG) ** 2, 1), 0))
    np.testing.assert_allclose(f.factors[i].lam_ekfac, ref, rtol=1e-9, atol=1e-12 * ref.max())


class Tied(nnx.Module):
    def __init__(self, rngs):
        self.emb = nnx.Embed(V, K, rngs=rngs)
        self.mix = nnx.Linear(K, K, rngs=rngs)

    def __call__(self, x):
        h = self.emb(x).mean(1)
        return self.emb.attend(self.mix(h))[:, :K]


class Shared(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(4, 4, rngs=rngs)
        self.head = nnx.Linear(4, K, rngs=rngs)

    def __call__(self, x):
        return self.head(self.lin(jnp.tanh(self.lin(x))))


def test_layers_it_cannot_factor_are_refused_with_the_fix():
    """Tied embeddings (`attend`) and a layer applied twice are refused while selected (the
    factors would describe one call of two); holding them fixed answers, and is what the
    default selection does (stated). Token ids outside an
    embedding's table are refused."""
    x, y = _tokens(n=30)
    m = Tied(nnx.Rngs(0))
    apply, params = models.functional(m)
    with pytest.raises(InputError, match="attend"):
        kfac.compute_factors(m, params, x, num_classes=K, weight_decay=WD)
    mix = {k for k in kfac.param_keys(params) if k[0] == "mix"}  # the tied embedding held fixed
    f = kfac.compute_factors(m, params, x, num_classes=K, weight_decay=WD, select=mix)
    assert [l.path for l in f.layers] == [("mix",)]
    xs = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    s = Shared(nnx.Rngs(0))
    sapply, sparams = models.functional(s)
    loss = models.per_sample_loss(sapply)
    with pytest.raises(InputError, match="called 2 times"):
        kfac.compute_factors(s, sparams, xs, num_classes=K, weight_decay=WD)
    res = Influence(loss, sparams, xs, y, num_classes=K, weight_decay=WD, apply=sapply, model=s,
        config=InfluenceConfig(solver="ekfac"), select="head").influence(xs, y)
    assert np.all(np.isfinite(res.P)) and "lin/kernel" in res.details["selection"]
    # by default (through Influence) only the layers K-FAC can answer are selected: the tied
    # embedding and the shared layer are held fixed, and said so; the same P as that selection
    for mod, ap, ps, xx, fixed, why, kept in ((m, apply, params, x, "emb", "attend", "mix"),
            (s, sapply, sparams, xs, "lin", "called 2 times", "head")):
        kw = dict(num_classes=K, weight_decay=WD, apply=ap, model=mod,
            config=InfluenceConfig(solver="ekfac"))
        lossm = models.per_sample_loss(ap)
        res = Influence(lossm, ps, xx, y, **kw).influence(xx, y)
        note = res.details["selection"]
        assert f"layer {fixed} held fixed" in note and why in note, note
        ref = Influence(lossm, ps, xx, y, select=kept, **kw).influence(xx, y)
        np.testing.assert_array_equal(res.P, ref.P)
        with pytest.raises(InputError, match=why):  # selected explicitly: refused
            Influence(lossm, ps, xx, y, select=(fixed, kept), **kw)
    b = Bag(nnx.Rngs(0))  # token ids outside the table: flax reads NaN (id V) or wraps (id −1)
    bparams = models.functional(b)[1]
    for bad, fisher in ((V, "expected"), (-1, "expected"), (V, "sampled"), (-1, "sampled")):
        xb = x.copy()
        xb[3, 2] = bad
        with pytest.raises(InputError, match=r"token ids .* \[0, 12\)"):
            kfac.compute_factors(b, bparams, xb, num_classes=K, weight_decay=WD, fisher=fisher)


class Conv1D(nnx.Module):
    """(B, L, C) -> 1-D conv (kernel 3, stride 2) -> tanh -> mean -> head; or the same written as
    a 2-D conv with a (1, 3) kernel on (B, 1, L, C) (`as_2d`)."""

    def __init__(self, rngs, as_2d=False):
        self.as_2d = as_2d
        self.conv = nnx.Conv(4, 5, kernel_size=(1, 3) if as_2d else (3,),
            strides=(1, 2) if as_2d else (2,), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(5, K, rngs=rngs)

    def __call__(self, x):
        h = self.conv(x[:, None] if self.as_2d else x)
        return self.head(jnp.tanh(h).reshape(x.shape[0], -1, 5).mean(1))


def test_a_1d_convolution_is_factored_as_the_2d_one_it_equals(x64, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(90, 9, 4))
    y = np.arange(90, dtype=np.int32) % K
    x[np.arange(90), :, y] += 1.0
    m1 = Conv1D(nnx.Rngs(0))
    apply, params, loss = _trained(m1, x, y, epochs=40)
    m2 = Conv1D(nnx.Rngs(0), as_2d=True)
    apply2, _ = models.functional(m2)
    params2 = {"head": params["head"], "conv": {"kernel": params["conv"]["kernel"][None],
        "bias": params["conv"]["bias"]}}
    np.testing.assert_allclose(apply2(params2, x), apply(params, x), rtol=1e-10)
    for solver in ("ekfac", "kfac"):
        a = _P(m1, apply, params, loss, x, y, solver).P
        b = _P(m2, apply2, params2, models.per_sample_loss(apply2), x, y, solver).P
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())
    m1.conv.padding = ((1, 1),)  # explicit padding (the same as SAME here) survives a round trip
    f = kfac.compute_factors(m1, params, x, num_classes=K, weight_decay=WD)
    assert f.layers[0].conv[2] == ((1, 1),)
    kfac.save_factors(tmp_path / "f.npz", f)
    back = kfac.load_factors(tmp_path / "f.npz")
    v = np.random.default_rng(0).normal(size=(2, f.num_params))
    np.testing.assert_array_equal(kfac.apply_inverse(back, v, damping=DAMP),
        kfac.apply_inverse(f, v, damping=DAMP))


def test_the_sampled_output_factor_is_unbiased_for_the_output_hessian(x64):
    """One drawn label per sample: the mean of r rᵀ over 40,000 draws equals diag p − ppᵀ
    (confident, non-uniform softmax) to Monte Carlo error (entries of r are within [−1, 1])."""
    z = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)) * 5)
    keys = jax.random.split(jax.random.PRNGKey(1), 40_000)
    r = jax.vmap(lambda k: kfac.sampled_root(z, k)[..., 0])(keys)  # (draws, 3, 5)
    mean = np.asarray(jnp.einsum("dbk,dbl->bkl", r, r) / len(keys))
    p = np.asarray(jax.nn.softmax(z))
    H = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    assert p.max() > 0.8  # far from uniform
    np.testing.assert_allclose(mean, H, atol=4 / np.sqrt(len(keys)))


def test_sampled_fisher_agrees_with_the_expected_one_and_is_seeded(x64):
    """EK-FAC with one drawn label per sample against the exact class expectation, on a digits MLP
    trained to confidence (mean top probability 0.96): measured Spearman 0.68-0.87 per class (a
    noisier estimate of the same matrix; two seeds agree at 0.45-0.9), the same P for the same
    seed; refused where there are no factors."""
    from scipy.stats import spearmanr

    from pareto_jax import data

    s = data.stratified_split(data.load_digits(), seed=0)
    m = models.make_model("mlp", (64,), 10, hidden=(32,), seed=0)
    apply, params = models.functional(m)
    loss = models.per_sample_loss(apply)
    params = train.train(loss, jax.tree_util.tree_map(lambda p: jnp.asarray(p, jnp.float64),
        params), s.train.x, s.train.y, train.TrainConfig(epochs=30, batch_size=64,
        learning_rate=0.01, weight_decay=WD)).params
    assert float(jax.nn.softmax(apply(params, s.train.x)).max(1).mean()) > 0.9

    def P(fisher, seed=0):
        cfg = InfluenceConfig(solver="ekfac", damping=DAMP, fisher=fisher, seed=seed)
        return np.asarray(Influence(loss, params, s.train.x, s.train.y, num_classes=10,
            weight_decay=WD, apply=apply, model=m, config=cfg).influence(s.val.x, s.val.y).P)

    exact, s0, s0_again, s1 = P("expected"), P("sampled"), P("sampled"), P("sampled", 1)
    np.testing.assert_array_equal(s0, s0_again)
    assert np.abs(s0 - s1).max() > 1e-2 * np.abs(s0).max()
    rho = [spearmanr(s0[:, k], exact[:, k])[0] for k in range(10)]
    assert np.median(rho) > 0.65 and min(rho) > 0.5, rho
    with pytest.raises(InputError, match="fisher"):
        InfluenceConfig(solver="cg", fisher="sampled")


class MaskedBag(nnx.Module):
    """{"ids": (B, T) tokens, "mask": (B, T) 0/1} -> Embed -> tanh, masked mean -> head."""

    def __init__(self, rngs):
        self.emb = nnx.Embed(V, D, dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(D, K, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.emb(x["ids"])) * x["mask"][..., None]
        return self.head(h.sum(1) / x["mask"].sum(1, keepdims=True))


def test_factors_from_dict_inputs_and_from_a_batch_source(x64):
    """Structured inputs (token ids with a padding mask) and a batch source that never holds the
    training set in memory give K-FAC / EK-FAC the same P as the arrays (float64 rounding)."""
    x, y = _tokens(seed=5)
    mask = (np.arange(T)[None] < np.arange(x.shape[0])[:, None] % 3 + 4).astype(np.float64)
    xd = {"ids": x, "mask": mask}
    m = MaskedBag(nnx.Rngs(0))
    apply, params, loss = _trained(m, xd, y, epochs=60)

    def source():
        for lo in range(0, len(y), 17):
            yield {"ids": x[lo:lo + 17], "mask": mask[lo:lo + 17]}, y[lo:lo + 17]

    for solver in ("ekfac", "kfac"):
        a = _P(m, apply, params, loss, xd, y, solver).P
        cfg = InfluenceConfig(solver=solver, damping=DAMP)
        b = Influence(loss, params, source, None, num_classes=K, weight_decay=WD, apply=apply,
            model=m, config=cfg).influence(xd, y).P
        np.testing.assert_allclose(b, a, rtol=1e-8, atol=1e-11 * np.abs(a).max())
