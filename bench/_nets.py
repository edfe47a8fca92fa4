"""Two more networks for the side-by-side deep benchmark (``bench/bench_deep.py``), both on MNIST
rows (inputs (n, 784) float, 10 classes), both with layers K-FAC cannot factor (norm layers, a
positional parameter) so that the influence is over the Linear / Conv layers with the rest held
fixed, by us (K-FAC / EK-FAC's default selection) and by Kronfluence (which tracks only
``nn.Linear`` / ``nn.Conv2d``) alike. Their PyTorch ports are in ``bench/_peer_torch.py``.

* "resnet" (`ResNet`, 38k params): conv 3×3 stride 2 → 16 ch (14×14) → BN → relu, three residual
  blocks [conv 3×3 → BN → relu → conv 3×3 → BN, + skip, relu]: 16 → 16, 16 → 32 with stride 2
  (7×7) and a 1×1 conv + BN projection on the skip, 32 → 32; global average pool; Linear → 10.
  Convolutions have no bias (BN follows) and explicit symmetric padding (1 for 3×3, 0 for 1×1),
  so torch's ``padding=`` is the same convolution (flax's "SAME" with stride 2 pads (0, 1)).
* "transformer" (`Transformer`, 19k params): the 28 image rows as 28 tokens, Linear 28 → 32
  plus a learned positional `nnx.Param` (28, 32), two pre-norm blocks [LayerNorm → multi-head
  self-attention (4 heads; q, k (no bias), v and the output projection four separate
  `nnx.Linear`, softmax(QKᵀ/√d_head) written out) → residual → LayerNorm → Linear 32 → 64 →
  exact gelu → Linear 64 → 32 → residual], mean over tokens, LayerNorm, Linear → 10. Written
  out rather than `nnx.MultiHeadAttention` because torch's ``nn.MultiheadAttention`` holds q/k/v
  in one parameter, not ``nn.Linear`` modules, and Kronfluence would not track them.

BatchNorm under `pareto_jax.models.functional` runs in evaluation mode with its running
statistics held fixed, in training too (`pareto_jax.train` goes through ``apply``). `make_net`
therefore sets them once, at initialisation, from a batch of training inputs
(`calibrate_batchnorm`: data-dependent initialisation), and they stay so; the torch port runs in
``.eval()`` with the same numbers. Norm epsilons are explicit (1e-5, torch's default) so that
both sides compute the same function.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["KINDS", "ResNet", "Transformer", "make_net", "calibrate_batchnorm", "NORM_EPS"]

KINDS = ("resnet", "transformer")
NORM_EPS = 1e-5  # BatchNorm and LayerNorm, both sides


def _conv(cin, cout, k, stride, rngs):
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=k // 2, use_bias=False,
        rngs=rngs)


def _bn(c, rngs):
    return nnx.BatchNorm(c, epsilon=NORM_EPS, momentum=0.9, rngs=rngs)


class Block(nnx.Module):
    """conv 3×3 (stride s) → BN → relu → conv 3×3 → BN, plus the skip (a 1×1 conv + BN
    projection when the shape changes), then relu."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1, self.bn1 = _conv(cin, cout, 3, stride, rngs), _bn(cout, rngs)
        self.conv2, self.bn2 = _conv(cout, cout, 3, 1, rngs), _bn(cout, rngs)
        if stride != 1 or cin != cout:
            self.proj, self.proj_bn = _conv(cin, cout, 1, stride, rngs), _bn(cout, rngs)
        else:
            self.proj, self.proj_bn = None, None

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        skip = x if self.proj is None else self.proj_bn(self.proj(x))
        return nnx.relu(h + skip)


class ResNet(nnx.Module):
    """Small ResNet with BatchNorm for (n, 28·28) MNIST rows (see the module docstring)."""

    def __init__(self, num_classes: int = 10, *, image_shape=(28, 28, 1), stem: int = 16,
        widths=((16, 1), (32, 2), (32, 1)), rngs: nnx.Rngs):
        self.image_shape = tuple(int(s) for s in image_shape)
        self.stem = _conv(self.image_shape[2], stem, 3, 2, rngs)
        self.stem_bn = _bn(stem, rngs)
        blocks, c = [], stem
        for w, s in widths:
            blocks.append(Block(c, w, s, rngs=rngs))
            c = w
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(c, num_classes, rngs=rngs)

    def features(self, x):
        h = x.reshape((x.shape[0], *self.image_shape))
        h = nnx.relu(self.stem_bn(self.stem(h)))
        for b in self.blocks:
            h = b(h)
        return jnp.mean(h, axis=(1, 2))

    def __call__(self, x):
        return self.head(self.features(x))


class Attention(nnx.Module):
    """Multi-head self-attention from four `nnx.Linear` (q, k, v, out)."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        if d % heads:
            raise ValueError(f"width {d} is not a multiple of {heads} heads")
        self.heads = heads
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, use_bias=False, rngs=rngs)  # a key bias shifts every score of
        # a query alike, so softmax cancels it: its gradient is exactly zero (Adam then moves it
        # by rounding noise alone), and it is a null direction of the loss
        self.v = nnx.Linear(d, d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        b, t, d = x.shape
        dh = d // self.heads

        def split(h):
            return h.reshape(b, t, self.heads, dh)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh), axis=-1)
        return self.out(jnp.einsum("bhts,bshd->bthd", a, v).reshape(b, t, d))


class TBlock(nnx.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, epsilon=NORM_EPS, rngs=rngs)
        self.attn = Attention(d, heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=NORM_EPS, rngs=rngs)
        self.fc1 = nnx.Linear(d, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, d, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x)), approximate=False))


class Transformer(nnx.Module):
    """Vision-transformer-style classifier on the image rows as tokens (see the module
    docstring)."""

    def __init__(self, num_classes: int = 10, *, image_shape=(28, 28, 1), d: int = 32,
        heads: int = 4, mlp: int = 64, depth: int = 2, rngs: nnx.Rngs):
        h, w, c = (int(s) for s in image_shape)
        self.tokens, self.token_dim = h, w * c
        self.embed = nnx.Linear(self.token_dim, d, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (h, d)))
        self.blocks = nnx.List([TBlock(d, heads, mlp, rngs=rngs) for _ in range(depth)])
        self.ln = nnx.LayerNorm(d, epsilon=NORM_EPS, rngs=rngs)
        self.head = nnx.Linear(d, num_classes, rngs=rngs)

    def features(self, x):
        h = self.embed(x.reshape(x.shape[0], self.tokens, self.token_dim)) + self.pos[...]
        for b in self.blocks:
            h = b(h)
        return self.ln(jnp.mean(h, axis=1))

    def __call__(self, x):
        return self.head(self.features(x))


def calibrate_batchnorm(model: nnx.Module, x) -> nnx.Module:
    """Set every BatchNorm's running mean and variance to the batch statistics of `x` (one
    forward pass in training mode with momentum 0), then put the model in evaluation mode.
    BatchNorms are reached in call order, so each sees the calibrated layers before it."""
    bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = 0.0
    model.train()
    model(jnp.asarray(x))
    model.eval()
    for m, mom in zip(bns, saved):
        m.momentum = mom
    return model


def make_net(kind: str, *, num_classes: int = 10, seed: int = 0, calibration=None) -> nnx.Module:
    """"resnet" or "transformer" for (n, 784) MNIST rows, in evaluation mode; `calibration`
    (inputs, e.g. 512 training rows) sets the ResNet's BatchNorm statistics
    (`calibrate_batchnorm`)."""
    rngs = nnx.Rngs(seed)
    if kind == "resnet":
        m = ResNet(num_classes, rngs=rngs)
        if calibration is not None:
            calibrate_batchnorm(m, np.asarray(calibration, np.float32))
    elif kind == "transformer":
        m = Transformer(num_classes, rngs=rngs)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    m.eval()
    return m
