"""PyTorch peer for the side-by-side benchmarks: pareto_jax's CNN / MLP and the ResNet /
transformer of ``bench/_nets.py`` ported to torch, and category-wise influence computed by
Kronfluence (EK-FAC, K-FAC, diagonal or identity) on the same network and data, in pareto_jax's
sign and scale convention.

Used by ``bench/bench_deep.py`` only when torch and kronfluence are importable (which checks the
ported network's logits equal ours before it times anything). Nothing here downloads data: the
caller passes arrays.

Install (a separate venv, never the test venv ``.venv``). The order matters: torch's CPU wheel
first and pinned, or pip pulls a multi-GB CUDA build; kronfluence without its dependencies,
because it declares ``torchvision`` (only its examples import it, and PyPI's torchvision does not
import beside this torch); then the project itself, pinned off jax 0.10.2::

    python3.11 -m venv .venv-bench
    .venv-bench/bin/pip install --upgrade pip
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install --no-deps kronfluence==1.0.1
    .venv-bench/bin/pip install torch==2.13.0 'accelerate>=0.31.0' 'einops>=0.8.0' \\
        'einconv>=0.1.0' 'opt-einsum>=3.3.0' 'safetensors>=0.4.2' 'tqdm>=4.66.4'
    .venv-bench/bin/pip install -e '.[vision]' jax==0.10.1 jaxlib==0.10.1 torch==2.13.0
    .venv-bench/bin/python -c "import jax, torch, kronfluence; print(jax.__version__,
    torch.__version__)"

(resolved here: torch 2.13.0+cpu, kronfluence 1.0.1, accelerate 1.15.0, jax/jaxlib 0.10.1,
flax 0.12.8; ``pip check`` then reports only the missing torchvision, which is expected.)

What Kronfluence computes (kronfluence 1.0.1 source, paths relative to the package)
--------------------------------------------------------------------------------------
Per-sample gradients. Kronfluence takes every layer's per-sample gradient from the backward
pass of the *summed* batch loss, so `compute_train_loss` and `compute_measurement` below return
sums over the batch (``reduction="sum"``); a mean would scale every gradient by 1/batch.

Factors, per nn.Linear / nn.Conv2d layer (bias as an appended input of 1):

* A = Σ ã ãᵀ / count_A and S = Σ δ δᵀ / count_S (``module/tracker/factor.py`` l.57-58, 89-93;
  normalised in ``factor/eigen.py`` l.199, then ``torch.linalg.eigh`` l.205, in float64).
  For a Linear layer the counts are the number of rows after ``b ... d_in -> (b ...) d_in``
  (``module/linear.py`` l.31, 45, 53): samples, or samples × tokens for a Linear applied to a
  sequence (b, t, d) (the transformer of ``bench/_nets.py``). For a Conv2d layer they are
  samples × output positions (``module/conv2d.py`` l.106-132: patches are
  rearranged to ``(b o1 o2) c_in_k1_k2`` and ``count = input_activation.size(0)``), i.e. both
  factors are averaged *per position* ("per token"). This matters only for the eigenvalues of
  strategy "kfac" (λ_A·λ_S is then 1/T of the Grosse-Martens KFC scale, T = positions), not for
  the eigenbasis.
* EK-FAC's corrected eigenvalues Λ = Σ_n (Q_Sᵀ G_n Q_A)² / N, with G_n sample n's full
  per-sample gradient (for a conv, summed over positions, ``module/conv2d.py`` l.164-177), N the
  number of data points (``module/tracker/factor.py`` l.169-203: ``NUM_LAMBDA_PROCESSED`` adds the
  batch size; divided in ``factor/config.py`` l.332). So Λ is a per-data-point second moment:
  the diagonal, in the K-FAC eigenbasis, of F = (1/N) Σ_n E_ŷ[g_n(ŷ) g_n(ŷ)ᵀ].
* The Fisher is the *true* Fisher when ``use_empirical_fisher=False``: the loss is backpropagated
  for one label ŷ ~ softmax(logits) per sample (``compute_train_loss(sample=True)``; the
  covariance pass and the Λ pass draw independently). pareto_jax's EK-FAC takes the exact
  expectation over classes (the Gauss-Newton matrix); in expectation the two are equal, the
  sampled one is noisier. With ``use_empirical_fisher=True`` the true labels are used.

Which parameters. ``prepare_model`` (``analyzer.py`` l.20-45) sets ``requires_grad = False`` on
every parameter and buffer and wraps only ``nn.Linear`` / ``nn.Conv2d`` (``module/utils.py``
l.78-80, exact type); gradients are read at those wrappers' outputs and scores summed over them.
So BatchNorm / LayerNorm scales and biases and a bare ``nn.Parameter`` (the transformer's
positional embedding) never enter the factors or the scores: the influence is over the Linear /
Conv layers with the rest held fixed, as pareto_jax's K-FAC / EK-FAC default selection
(``kfac.FACTORED_TYPES``) and its CG with ``select=(nnx.Linear, nnx.Conv)``.

Damping and the linear system. ``Ekfac.prepare`` (``factor/config.py`` l.322-339) forms
1/(Λ + δ) with δ = ``ScoreArguments.damping_factor`` added as an absolute number (no scaling by
the mean eigenvalue unless ``damping_factor=None``: then δ = 0.1·mean Λ, l.334-335), and
``precondition_gradient`` (l.341-353) returns Q_S [(Q_Sᵀ G Q_A) / (Λ + δ)] Q_Aᵀ. Because Q_A ⊗ Q_S
is orthonormal that is exactly

    u_q = (F̂_EKFAC + δ I)⁻¹ ∇m(z_q),     F̂_EKFAC = (Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ,

block-diagonal over the tracked layers, F̂ per data point (the curvature of the *mean* training
loss, no weight decay). The pairwise score is score(q, i) = u_qᵀ ∇ℓ(z_i) summed over layers
(``module/tracker/pairwise_score.py``; ``module/linear.py`` l.112-122), with no sign flip and no
1/N. "kfac": Λ replaced by λ_A ⊗ λ_S (l.253-270). "identity" (l.128-165): no preconditioning at
all, the damping is ignored (score = ∇m(z_q)ᵀ∇ℓ(z_i), not divided by 1 + δ).

pareto_jax's EK-FAC (`pareto_jax.kfac.solve_kfac`) solves (F̂ + δI)⁻¹ b with the same
per-data-point F̂ (A = E[Σ_t ããᵀ/T], per-sample gradients summed over positions) and δ including
the weight decay λ of its objective. So for a matched comparison pass pareto_jax's δ (weight decay
included) as `damping` here.

Sign and scale. With m = cross-entropy on the true label, ∇m(z_q) averaged over the validation
samples of class k is g_k, so

    P[i, k] = (1/N) · mean_{q: y_q = k} score(q, i) = (1/N) g_kᵀ (F̂ + δI)⁻¹ ∇ℓ(z_i),

which is pareto_jax's definition (docs/method.md §2) as it stands: no sign flip is needed
(P > 0 = up-weighting z_i lowers class k's validation loss). The self-test pins this against
JAX per-sample gradients with strategy "identity".
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TorchCNN", "TorchMLP", "TorchResNet", "TorchTransformer", "torch_model_from_jax",
    "kronfluence_category_influence", "KRONFLUENCE_INSTALL"]

NORM_EPS = 1e-5  # = bench._nets.NORM_EPS: BatchNorm / LayerNorm epsilon, set on both sides

KRONFLUENCE_INSTALL = (
    "pip install torch==2.13.0 && pip install --no-deps kronfluence==1.0.1 && "
    "pip install torch==2.13.0 accelerate einops einconv opt-einsum safetensors tqdm"
)


# ----------------------------------------------------------------------------- the port


def _seq(tree) -> list:
    """The layers of an nnx.List as a list, whatever its pure-dict form (int keys, str keys,
    or a list)."""
    if isinstance(tree, (list, tuple)):
        return list(tree)
    return [tree[k] for k in sorted(tree, key=lambda k: int(k))]


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True))


class TorchCNN(nn.Module):
    """pareto_jax.models.CNN in torch: [conv3×3 SAME → tanh → avgpool 2×2 (if H, W > 1)]* →
    flatten in NHWC order → dense → tanh → head. Input: (n, H·W·C) flattened NHWC images."""

    def __init__(self, image_shape, channels, dense: int, num_classes: int):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        h, w, c = self.image_shape
        convs = []
        for ch in channels:
            convs.append(nn.Conv2d(c, int(ch), 3, padding=1))
            c = int(ch)
            h, w = max(h // 2, 1), max(w // 2, 1)
        self.convs = nn.ModuleList(convs)
        self.fc = nn.Linear(h * w * c, dense)
        self.head = nn.Linear(dense, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], *self.image_shape).permute(0, 3, 1, 2)  # NHWC -> NCHW
        for conv in self.convs:
            h = torch.tanh(conv(h))
            if h.shape[2] > 1 and h.shape[3] > 1:
                h = F.avg_pool2d(h, 2, 2)
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # flatten in flax's (H, W, C) order
        return torch.tanh(self.fc(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TorchMLP(nn.Module):
    """pareto_jax.models.MLP in torch: tanh hidden layers, linear head."""

    def __init__(self, in_features: int, hidden, num_classes: int):
        super().__init__()
        sizes = [int(in_features), *(int(h) for h in hidden)]
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nn.Linear(sizes[-1], num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = torch.tanh(layer(h))
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TorchBlock(nn.Module):
    """bench._nets.Block in torch: conv 3×3 → BN → relu → conv 3×3 → BN, + skip, relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout, eps=NORM_EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=NORM_EPS)
        if stride != 1 or cin != cout:
            self.proj = nn.Conv2d(cin, cout, 1, stride, padding=0, bias=False)
            self.proj_bn = nn.BatchNorm2d(cout, eps=NORM_EPS)
        else:
            self.proj, self.proj_bn = None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        skip = x if self.proj is None else self.proj_bn(self.proj(x))
        return F.relu(h + skip)


class TorchResNet(nn.Module):
    """bench._nets.ResNet in torch (NCHW inside; input (n, H·W·C) flattened NHWC images). Run in
    .eval(): BatchNorm on the running statistics, as `models.functional` runs the flax model."""

    def __init__(self, image_shape, stem: int, widths, num_classes: int):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.stem = nn.Conv2d(self.image_shape[2], stem, 3, 2, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem, eps=NORM_EPS)
        blocks, c = [], stem
        for w, s in widths:
            blocks.append(TorchBlock(c, int(w), int(s)))
            c = int(w)
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], *self.image_shape).permute(0, 3, 1, 2)  # NHWC -> NCHW
        h = F.relu(self.stem_bn(self.stem(h)))
        for b in self.blocks:
            h = b(h)
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TorchAttention(nn.Module):
    """bench._nets.Attention in torch: four nn.Linear (q, k, v, out), so Kronfluence tracks all
    four (nn.MultiheadAttention keeps q/k/v in one parameter, which it would not)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k = nn.Linear(d, d), nn.Linear(d, d, bias=False)  # (as bench._nets)
        self.v, self.out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        dh = d // self.heads
        q, k, v = (m(x).reshape(b, t, self.heads, dh) for m in (self.q, self.k, self.v))
        a = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh), dim=-1)
        return self.out(torch.einsum("bhts,bshd->bthd", a, v).reshape(b, t, d))


class TorchTBlock(nn.Module):
    """bench._nets.TBlock in torch: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=NORM_EPS)
        self.attn = TorchAttention(d, heads)
        self.ln2 = nn.LayerNorm(d, eps=NORM_EPS)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))  # exact gelu (flax: approximate=False)


class TorchTransformer(nn.Module):
    """bench._nets.Transformer in torch: image rows as tokens, Linear embedding + a learned
    positional parameter (not tracked by Kronfluence, as it is held fixed by our K-FAC)."""

    def __init__(self, image_shape, d: int, heads: int, mlp: int, depth: int, num_classes: int):
        super().__init__()
        h, w, c = (int(s) for s in image_shape)
        self.tokens, self.token_dim = h, w * c
        self.embed = nn.Linear(self.token_dim, d)
        self.pos = nn.Parameter(torch.zeros(h, d))
        self.blocks = nn.ModuleList([TorchTBlock(d, heads, mlp) for _ in range(depth)])
        self.ln = nn.LayerNorm(d, eps=NORM_EPS)
        self.head = nn.Linear(d, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.reshape(x.shape[0], self.tokens, self.token_dim)) + self.pos
        for b in self.blocks:
            h = b(h)
        return self.ln(h.mean(dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _load_dense(layer: nn.Linear, p) -> None:
    k = np.asarray(p["kernel"])  # flax (in, out)
    if tuple(layer.weight.shape) != (k.shape[1], k.shape[0]):
        raise ValueError(
            f"dense kernel {k.shape} does not fit torch layer {tuple(layer.weight.shape)}"
        )
    layer.weight.data.copy_(_t(k.T))
    if layer.bias is not None:
        layer.bias.data.copy_(_t(p["bias"]))
    elif "bias" in p:
        raise ValueError("the flax dense layer has a bias, the torch layer none")


def _load_conv(layer: nn.Conv2d, p) -> None:
    k = np.asarray(p["kernel"])  # flax (kh, kw, cin, cout) -> torch (cout, cin, kh, kw)
    kt = k.transpose(3, 2, 0, 1)
    if tuple(layer.weight.shape) != kt.shape:
        raise ValueError(
            f"conv kernel {k.shape} does not fit torch layer {tuple(layer.weight.shape)}"
        )
    layer.weight.data.copy_(_t(kt))
    if layer.bias is not None:
        layer.bias.data.copy_(_t(p["bias"]))
    elif "bias" in p:
        raise ValueError("the flax conv has a bias, the torch layer none")


def _load_norm(layer: nn.Module, p, stats=None) -> None:
    """flax LayerNorm / BatchNorm scale and bias, and BatchNorm's running mean and variance
    (`stats`, {"mean", "var"}) into torch's LayerNorm / BatchNorm2d."""
    layer.weight.data.copy_(_t(p["scale"]))
    layer.bias.data.copy_(_t(p["bias"]))
    if stats is not None:
        layer.running_mean.data.copy_(_t(stats["mean"]))
        layer.running_var.data.copy_(_t(stats["var"]))


def torch_model_from_jax(kind: str, params, *, image_shape=(28, 28, 1), num_classes: int = 10,
    batch_stats=None, heads: int = 4) -> nn.Module:
    """A float32 torch module (eval mode) whose logits equal pareto_jax's
    ``models.functional(model)[0](params, x)`` for the same (n, d) float input x.

    Args:
        kind: "cnn", "mlp", or "resnet" / "transformer" (``bench._nets``). The architecture is
            read off `params`: conv channels, dense width, hidden sizes; a ResNet block's stride
            is 2 where it has a projection (``bench._nets``' convention); the transformer's
            width, MLP width, depth and token count.
        params: the nested dict of `nnx.to_pure_dict` (``models.functional(model)[1]``).
        image_shape: (H, W, C) of the flattened NHWC images, for "cnn" and "resnet".
        num_classes: K (checked against the head).
        batch_stats: for "resnet", the BatchNorm running statistics, which are not params:
            ``nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))`` ({"mean", "var"} per layer).
        heads: attention heads, for "transformer" (not visible in the params).
    """
    if kind == "cnn":
        convs = _seq(params["convs"])
        channels = [int(np.shape(c["kernel"])[-1]) for c in convs]
        dense = int(np.shape(params["fc"]["kernel"])[1])
        model = TorchCNN(image_shape, channels, dense, num_classes)
        for layer, p in zip(model.convs, convs):
            _load_conv(layer, p)
        _load_dense(model.fc, params["fc"])
    elif kind == "mlp":
        layers = _seq(params.get("layers", {}))
        in_features = (
            int(np.shape(layers[0]["kernel"])[0])
            if layers
            else int(np.shape(params["head"]["kernel"])[0])
        )
        hidden = [int(np.shape(p["kernel"])[1]) for p in layers]
        model = TorchMLP(in_features, hidden, num_classes)
        for layer, p in zip(model.layers, layers):
            _load_dense(layer, p)
    elif kind == "resnet":
        if batch_stats is None:
            raise ValueError("kind 'resnet' needs batch_stats (its BatchNorm running statistics)")
        blocks = _seq(params["blocks"])
        bstats = _seq(batch_stats["blocks"])
        stem = int(np.shape(params["stem"]["kernel"])[-1])
        widths = [
            (int(np.shape(b["conv1"]["kernel"])[-1]), 2 if "proj" in b else 1) for b in blocks
        ]
        model = TorchResNet(image_shape, stem, widths, num_classes)
        _load_conv(model.stem, params["stem"])
        _load_norm(model.stem_bn, params["stem_bn"], batch_stats["stem_bn"])
        for layer, p, st in zip(model.blocks, blocks, bstats):
            names = ("1", "2", "proj") if layer.proj is not None else ("1", "2")
            for nm in names:
                conv, bn = ("proj", "proj_bn") if nm == "proj" else (f"conv{nm}", f"bn{nm}")
                _load_conv(getattr(layer, conv), p[conv])
                _load_norm(getattr(layer, bn), p[bn], st[bn])
    elif kind == "transformer":
        blocks = _seq(params["blocks"])
        token_dim, d = (int(v) for v in np.shape(params["embed"]["kernel"]))
        tokens = int(np.shape(params["pos"])[0])
        if tokens * token_dim != int(np.prod(image_shape)):
            raise ValueError(f"{tokens} tokens of {token_dim} do not fit image {image_shape}")
        mlp = int(np.shape(blocks[0]["fc1"]["kernel"])[1])
        model = TorchTransformer(image_shape, d, heads, mlp, len(blocks), num_classes)
        _load_dense(model.embed, params["embed"])
        model.pos.data.copy_(_t(params["pos"]))
        for layer, p in zip(model.blocks, blocks):
            for nm in ("ln1", "ln2"):
                _load_norm(getattr(layer, nm), p[nm])
            for nm in ("q", "k", "v", "out"):
                _load_dense(getattr(layer.attn, nm), p["attn"][nm])
            _load_dense(layer.fc1, p["fc1"])
            _load_dense(layer.fc2, p["fc2"])
        _load_norm(model.ln, params["ln"])
    else:
        raise ValueError(f"kind must be 'cnn', 'mlp', 'resnet' or 'transformer', got {kind!r}")
    _load_dense(model.head, params["head"])
    return model.float().eval()


# ----------------------------------------------------------------------------- Kronfluence


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _make_task():
    from kronfluence.task import Task

    class ClassificationTask(Task):
        """Cross-entropy classification. Both losses are *sums* over the batch (Kronfluence reads
        per-sample gradients off the backward pass of the batch total)."""

        def compute_train_loss(
            self, batch: Any, model: nn.Module, sample: bool = False
        ) -> torch.Tensor:
            x, y = batch
            logits = model(x)
            if not sample:
                return F.cross_entropy(logits, y, reduction="sum")
            with torch.no_grad():  # the true Fisher: labels drawn from the model's own predictive
                y_hat = torch.multinomial(
                    torch.softmax(logits.detach(), dim=-1), num_samples=1
                ).flatten()
            return F.cross_entropy(logits, y_hat, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(model(x), y, reduction="sum")

    return ClassificationTask()


def _one_run(torch_model, train_ds, query_ds, *, strategy, use_empirical_fisher, damping, seed,
    batch_size, query_batch_size, run_dir: Path) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.module.tracked_module import TrackedModule

    rss_before = _status("VmRSS")
    peak_ok = _reset_peak()
    torch.manual_seed(seed)  # the sampled labels of the true Fisher
    task = _make_task()
    model = prepare_model(copy.deepcopy(torch_model).float().eval(), task)
    analyzer = Analyzer(analysis_name="pareto_peer", model=model, task=task, cpu=True,
        disable_tqdm=True, output_dir=str(run_dir), log_level=logging.WARNING)
    fargs = FactorArguments(strategy=strategy, use_empirical_fisher=use_empirical_fisher)
    sargs = ScoreArguments(damping_factor=float(damping))
    t = {}
    t0 = time.perf_counter()
    analyzer.fit_covariance_matrices(
        "factors", train_ds, per_device_batch_size=batch_size, factor_args=fargs
    )
    t["covariance_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyzer.perform_eigendecomposition("factors", factor_args=fargs)
    t["eigendecomposition_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    analyzer.fit_lambda_matrices(
        "factors", train_ds, per_device_batch_size=batch_size, factor_args=fargs
    )
    t["lambda_s"] = time.perf_counter() - t0
    t["factors_s"] = t["covariance_s"] + t["eigendecomposition_s"] + t["lambda_s"]
    t0 = time.perf_counter()
    analyzer.compute_pairwise_scores("scores", "factors", query_dataset=query_ds,
        train_dataset=train_ds, per_device_query_batch_size=query_batch_size,
        per_device_train_batch_size=batch_size, score_args=sargs)
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    t["scores_s"] = time.perf_counter() - t0
    t["total_s"] = t["factors_s"] + t["scores_s"]
    hwm = _status("VmHWM") if peak_ok else -1
    t["rss_before_bytes"] = rss_before
    t["peak_rss_bytes"] = hwm
    t["peak_extra_bytes"] = max(hwm - rss_before, 0) if peak_ok else -1

    mean_lambda = None
    if strategy in ("ekfac", "diagonal"):
        lam = analyzer.load_lambda_matrices("factors")
        tot, cnt = 0.0, 0
        for name, m in lam["lambda_matrix"].items():
            n = float(lam["num_lambda_processed"][name].sum())
            tot += float(m.double().sum()) / n
            cnt += m.numel()
        mean_lambda = tot / max(cnt, 1)
    modules = [n for n, mod in model.named_modules() if isinstance(mod, TrackedModule)]
    return {"scores": scores.double().numpy(), "timings": t, "mean_lambda": mean_lambda,
        "tracked_modules": modules}


def kronfluence_category_influence(torch_model: nn.Module, x_train, y_train, x_val, y_val, *,
    num_classes: int, damping: float, strategy: str = "ekfac", use_empirical_fisher: bool = False,
    seed: int = 0, batch_size: int = 256, query_batch_size: int | None = None, workdir: str | Path,
    repeats: int = 2, keep_files: bool = False, num_threads: int = 2) -> dict:
    """Category-wise influence P (N, K) by Kronfluence, in pareto_jax's convention.

    P[i, k] = (1/N) · mean over validation samples q of class k of score(q, i), where score is
    Kronfluence's pairwise score with m = cross-entropy on q's true label, i.e.
    (1/N) g_kᵀ (F̂ + damping·I)⁻¹ ∇ℓ(z_i) with F̂ the per-data-point EK-FAC (or K-FAC / diagonal)
    Fisher of the mean training loss (see the module docstring). P > 0 = beneficial.

    Args:
        torch_model: e.g. `torch_model_from_jax(...)` (copied; the argument is left untouched).
        x_train, y_train, x_val, y_val: arrays as pareto_jax takes them ((n, d) float, int labels).
        num_classes: K; every class must occur in y_val.
        damping: δ, added to every eigenvalue (ignored by strategy "identity").
        strategy: Kronfluence's "ekfac", "kfac", "diagonal" or "identity".
        use_empirical_fisher: true labels instead of labels sampled from the model (true Fisher).
        seed: torch seed for the sampled labels (each repeat reseeds, so repeats agree).
        batch_size: training batch for factors and scores; query_batch_size: validation batch for
            the query gradients (default: all of it, so the training set is read once).
        workdir: Kronfluence writes factors and scores here, in a fresh sub-folder per repeat
            (nothing is reused from disk); removed afterwards unless `keep_files`.
        repeats: pipeline runs in this process (first call, then warm calls), each timed.

    Returns:
        dict with "P" (N, K) float64 from the last run, "scores_shape", "runs" (per-run timings:
        covariance_s, eigendecomposition_s, lambda_s, factors_s, scores_s, total_s,
        rss_before_bytes, peak_rss_bytes, peak_extra_bytes), the first / second call's
        factors_s and scores_s, "max_run_diff" (max |P_run − P_last| over runs), "mean_lambda"
        (mean EK-FAC eigenvalue, for damping choices), and the settings.
    """
    import kronfluence

    torch.set_num_threads(int(num_threads))
    x_train = np.asarray(x_train, np.float32).reshape(len(x_train), -1)
    x_val = np.asarray(x_val, np.float32).reshape(len(x_val), -1)
    y_train = np.asarray(y_train).astype(np.int64)
    y_val = np.asarray(y_val).astype(np.int64)
    counts = np.bincount(y_val, minlength=num_classes)
    if counts.shape[0] != num_classes or np.any(counts == 0):
        raise ValueError(
            f"every class 0..{num_classes - 1} must occur in y_val (counts {counts.tolist()})"
        )
    n = x_train.shape[0]
    train_ds = torch.utils.data.TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train))
    query_ds = torch.utils.data.TensorDataset(torch.from_numpy(x_val), torch.from_numpy(y_val))
    qbs = int(query_batch_size or len(x_val))
    onehot = np.eye(num_classes)[y_val] / counts  # (n_val, K): class means

    root = Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    runs, Ps, last = [], [], None
    for r in range(int(repeats)):
        run_dir = root / f"kronfluence_{strategy}_{r}_{uuid.uuid4().hex[:8]}"
        try:
            with warnings.catch_warnings():
                # kronfluence 1.0.1 builds torch.cuda.amp.GradScaler(enabled=False): a FutureWarning
                warnings.filterwarnings("ignore", category=FutureWarning, message=".*GradScaler.*")
                last = _one_run(torch_model, train_ds, query_ds, strategy=strategy,
                    use_empirical_fisher=use_empirical_fisher, damping=damping, seed=seed,
                    batch_size=int(batch_size), query_batch_size=qbs, run_dir=run_dir)
        finally:
            if not keep_files:
                shutil.rmtree(run_dir, ignore_errors=True)
        S = last["scores"]  # (n_val, N)
        Ps.append((onehot.T @ S).T / n)
        runs.append(last["timings"])
    P = Ps[-1]
    out = {
        "P": P,
        "scores_shape": tuple(last["scores"].shape),
        "runs": runs,
        "factors_s_first": runs[0]["factors_s"],
        "scores_s_first": runs[0]["scores_s"],
        "factors_s_second": runs[1]["factors_s"] if len(runs) > 1 else None,
        "scores_s_second": runs[1]["scores_s"] if len(runs) > 1 else None,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
        "max_run_diff": float(max(np.max(np.abs(p - P)) for p in Ps)),
        "mean_lambda": last["mean_lambda"],
        "tracked_modules": last["tracked_modules"],
        "strategy": strategy,
        "damping": float(damping),
        "use_empirical_fisher": bool(use_empirical_fisher),
        "fisher": "empirical" if use_empirical_fisher else "true (one sampled label per sample)",
        "seed": seed,
        "batch_size": int(batch_size),
        "query_batch_size": qbs,
        "num_threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "kronfluence": kronfluence.__version__},
        "system": "u = (F̂ + δI)⁻¹ g_k, F̂ per data point, block-diagonal over layers; "
        "P = (1/N) uᵀ∇ℓ_i; identity: P = (1/N) g_kᵀ∇ℓ_i (δ ignored)",
    }
    return out
