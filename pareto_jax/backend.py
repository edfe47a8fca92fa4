"""Where the influence stages run: one device (`Local`, here) or a mesh (`sharded.Sharded`).

A backend places samples and runs the `kernels` on them; `pareto_jax.influence` (the front door)
validates input, picks the algorithm and calls a backend, so it never needs to know whether the
data sit on one device or many. Both backends have the same methods:

* ``chunks(x, y, chunk_size, dtype)`` -> `kernels.Chunks` placed for this backend;
* ``class_gradients(f, theta, chunks, y, num_classes)`` -> (K, P);
* ``objective(theta, chunks, n, weight_decay)`` -> `kernels.ObjectiveData` placed for this backend;
* ``matvec(curvature, data)`` -> V (K, P) -> (H + λI) V, batched over the rows;
* ``solve(method, curvature, data, G, damping, rtol, atol, max_steps, factors=None, ekfac=True)``
  -> `linsolve.SolveResult` with method "cg" (preconditioned by K-FAC/EK-FAC `factors` when
  given) or "dense";
* ``lissa(curvature, data, G, *, scale, damping, rtol, max_steps, seed)`` -> LiSSA's result,
  one chunk of the training set per draw;
* ``factors(model, params, x, y, *, batch_size, num_classes, output_loss, weight_decay)`` ->
  `kfac.Factors` of the training set (K-FAC / EK-FAC);
* ``influence_rows(f, method, theta, U, chunks, n_real)`` -> P as a (n_real, K) array;
* ``execution``: "compiled" or "stepped", how the loops ran (reported in every result).

`Local` runs each stage either as one compiled program ("compiled": `lax.scan` over chunks, CG
in a `while_loop`) or with its loops on the host over jitted chunk programs ("stepped"), which
is what XLA:CPU needs for models with convolutions (`kernels.loops_on_host`). Both run the same
chunk kernels and the same CG steps; the tests check that they agree. Every jitted function
takes the data as arguments (never captured as constants), and the static arguments are cached
per model, so a second call does not recompile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from . import kernels, kfac, linsolve
from .kernels import Chunks, Curvature, ObjectiveData

# ----------------------------------------------------------------------------- compiled programs


@functools.partial(jax.jit, static_argnums=(0, 4))
def class_gradients_program(f, theta, chunks, counts, K):
    return kernels.class_gradients(f, theta, chunks, counts, K)


@functools.partial(jax.jit, static_argnums=(0,))
def matvec_program(curv, data, V):
    """(H + λI) V for the rows of V, the chunk loop inside one program."""
    return jax.vmap(kernels.curvature_matvec(curv, data))(V)


@functools.partial(jax.jit, static_argnums=(0, 1, 7), static_argnames=("layers", "layout", "ekfac"))
def solve_program(method, curv, data, G, damping, rtol, atol, max_steps, factor_arrays=None, *,
    layers=None, layout=None, ekfac=True):
    """The whole solve as one program: CG (preconditioned by K-FAC/EK-FAC factors when given)
    or the dense reference."""
    matvec = kernels.curvature_matvec(curv, data)
    if method == "dense":
        return linsolve.solve_dense(
            matvec, G, damping=damping, rtol=rtol, atol=atol, max_steps=max_steps
        )
    precond = None
    if factor_arrays is not None:  # λ is the objective's (in `data`), δ the damping
        factors = kfac.Factors(layers, factor_arrays, layout, G.shape[-1], data.weight_decay)
        precond = kfac.preconditioner(factors, damping, ekfac=ekfac)
    return linsolve.solve_cg(
        matvec, G, damping=damping, rtol=rtol, atol=atol, max_steps=max_steps, precond=precond
    )


@functools.partial(jax.jit, static_argnums=(0, 1))
def influence_rows_program(f, method, theta, U, chunks, n):
    return kernels.influence_rows(f, method, theta, U, chunks).reshape(-1, U.shape[0]) / n


@functools.partial(jax.jit, static_argnums=(0, 6))
def lissa_program(curv, data, G, scale, damping, rtol, max_steps, seed):
    def batch_matvec(v, i):
        # the curvature of the objective on minibatch i alone (mean over its samples, plus λv)
        c = jax.tree_util.tree_map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0), data.chunks)
        d = ObjectiveData(data.theta, c, jnp.maximum(jnp.sum(c.mask), 1.0), data.weight_decay,
            data.mask)
        return kernels.curvature_matvec(curv, d)(v)

    return linsolve.solve_lissa(batch_matvec, G, data.chunks.mask.shape[0], scale=scale,
        damping=damping, rtol=rtol, max_steps=max_steps, seed=seed)


# ------------------------------------------------------------------------- chunk programs (stepped)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _class_gradient_step(f, K, acc, theta, xb, yb, mb, counts):
    return acc + kernels.class_gradient_chunk(f, theta, xb, yb, mb, counts, K)


@functools.partial(jax.jit, static_argnums=(0,))
def _product_step(curv, acc, theta, xb, yb, mb, V):
    return acc + jax.vmap(lambda v: kernels.chunk_product(curv, theta, xb, yb, mb, v))(V)


@jax.jit
def _finish_product(acc, V, n, weight_decay, mask):
    U = V if mask is None else V * mask
    return kernels.restrict(acc / n + weight_decay * U, V, mask)


@functools.partial(jax.jit, static_argnums=(0,))
def _jvp_rows_step(f, theta, U, xb, yb, mb):
    return kernels.jvp_chunk(f, theta, U, xb, yb) * mb[:, None]


@functools.partial(jax.jit, static_argnums=(0,))
def _rows_step(f, theta, U, xb, yb, mb):
    return kernels.per_sample_chunk(f, theta, U, xb, yb) * mb[:, None]


class Local:
    """One device: arrays go to the default device; each stage runs as one compiled program or
    with its loops on the host ("stepped"; the default on CPU, see `kernels.loops_on_host`)."""

    def __init__(self, execution: str = "auto", progress: bool = False):
        self.execution = "stepped" if kernels.loops_on_host(execution) else "compiled"
        self.progress = progress  # a CG progress bar (stepped solves only)

    @property
    def stepped(self) -> bool:
        return self.execution == "stepped"

    def _on_host(self, chunks) -> bool:
        """Whether a stage over `chunks` loops on the host: stepped execution, or a `kernels.Stream`
        (its chunks arrive one at a time, so no single program can hold them)."""
        return self.stepped or isinstance(chunks, kernels.Stream)

    def chunks(self, x, y, chunk_size: int, dtype) -> Chunks:
        """Padded chunks on the device, or for a `kernels.Source` a `kernels.Stream` that puts
        one chunk on the device at a time (every stage then runs stepped)."""
        if isinstance(x, kernels.Source):
            return kernels.Stream(x, chunk_size, dtype)
        xc, yc, mc = kernels.pad_chunks(x, y, chunk_size)
        return Chunks(kernels.cast_floats(xc, dtype), jax.tree_util.tree_map(jnp.asarray, yc),
            jnp.asarray(mc, dtype))

    def class_gradients(self, f, theta, chunks: Chunks, y, num_classes: int):
        counts = np.bincount(np.asarray(y), minlength=num_classes).astype(np.float64)
        counts = jnp.asarray(np.maximum(counts, 1), theta.dtype)
        if not self._on_host(chunks):
            return class_gradients_program(f, theta, chunks, counts, num_classes)
        acc = jnp.zeros((num_classes, theta.size), theta.dtype)
        for xb, yb, mb in kernels.iter_chunks(chunks):
            acc = _class_gradient_step(f, num_classes, acc, theta, xb, yb, mb, counts)
        return acc

    def objective(self, theta, chunks: Chunks, n: int, weight_decay: float,
        mask=None) -> ObjectiveData:
        dt = theta.dtype
        return ObjectiveData(theta, chunks, jnp.asarray(n, dt), jnp.asarray(weight_decay, dt),
            None if mask is None else jnp.asarray(mask, dt))

    def matvec(self, curv: Curvature, data: ObjectiveData):
        """V (K, P) -> (H + λI) V."""
        if not self._on_host(data.chunks):
            return lambda V: matvec_program(curv, data, V)

        def stepped(V):
            acc = jnp.zeros_like(V)
            U = V if data.mask is None else V * data.mask
            for xb, yb, mb in kernels.iter_chunks(data.chunks):
                acc = _product_step(curv, acc, data.theta, xb, yb, mb, U)
            return _finish_product(acc, V, data.n, data.weight_decay, data.mask)

        return stepped

    def solve(self, method, curv, data, G, damping, rtol, atol, max_steps, *, factors=None,
        ekfac: bool = True) -> linsolve.SolveResult:
        """CG or dense; with `factors` (`kfac.Factors`), CG preconditioned by them."""
        if self._on_host(data.chunks) and method == "cg":
            dmp = jnp.asarray(damping, data.theta.dtype)  # (λ + δ then sums in the data's dtype)
            pre = (
                None
                if factors is None
                else (lambda R: kfac.apply_inverse(factors, R, damping=dmp, ekfac=ekfac))
            )
            return linsolve.solve_cg_stepped(self.matvec(curv, data), G, damping=damping, rtol=rtol,
                atol=atol, max_steps=int(max_steps), precond_batched=pre, progress=self.progress)
        dt = data.theta.dtype
        args = (method, curv, data, G, jnp.asarray(damping, dt), jnp.asarray(rtol, dt),
            jnp.asarray(atol, dt), int(max_steps))
        if factors is None:
            return solve_program(*args)
        return solve_program(
            *args, factors.factors, layers=factors.layers, layout=factors.layout, ekfac=ekfac
        )

    def lissa(
        self, curv, data, G, *, scale, damping, rtol, max_steps, seed
    ) -> linsolve.SolveResult:
        """LiSSA with minibatch curvature products, one chunk of `data` per draw (compiled)."""
        return lissa_program(curv, data, G, scale, damping, rtol, int(max_steps), seed)

    def factors(self, model, params, x, y, *, batch_size, num_classes, output_loss, weight_decay,
        select=None, fisher, seed):
        """K-FAC / EK-FAC factors of the training set, streamed in batches on this device."""
        return kfac.compute_factors(model, params, x, batch_size=batch_size,
            num_classes=num_classes, y=y, output_loss=output_loss, weight_decay=weight_decay,
            select=select, fisher=fisher, seed=seed)

    def influence_rows(self, f, method, theta, U, chunks: Chunks, n_real: int):
        U = jnp.asarray(U, theta.dtype)
        if isinstance(chunks, kernels.Stream):  # rows written to the host as each chunk is done
            step = _jvp_rows_step if method == "jvp" else _rows_step
            P = np.zeros((n_real, U.shape[0]), np.dtype(theta.dtype))
            i = 0
            for xb, yb, mb in chunks:
                r = np.asarray(step(f, theta, U, xb, yb, mb))[: min(chunks.chunk, n_real - i)]
                P[i : i + len(r)] = r
                i += len(r)
            if i != n_real:
                raise ValueError(
                    f"the training source yielded {i} samples on this pass, {n_real} on the first: "
                    "batches() must give the same samples every time it is called"
                )
            P /= n_real
            return jnp.asarray(P)
        if not self.stepped or method == "jvp":  # forward mode only: fast inside a loop too
            return influence_rows_program(f, method, theta, U, chunks, n_real)[:n_real]
        rows = [_rows_step(f, theta, U, xb, yb, mb) for xb, yb, mb in kernels.iter_chunks(chunks)]
        return (jnp.concatenate(rows) / n_real)[:n_real]
