"""The influence backend over a device mesh: `Sharded`, the same methods as `backend.Local` with
the samples sharded over the mesh's "data" axis (placement by `pareto_jax.distributed`).

Every shard_map here uses check_vma=False and reduces with explicit psums: with the check on,
differentiating w.r.t. replicated params inserts its own psum, which would count twice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from . import checks, kernels, kfac, linsolve
from .distributed import AXIS, local_rows, replicate, shard_chunks
from .kernels import Chunks, ObjectiveData

_DATA = P(None, AXIS)


def _local_objective(theta, xc, yc, mc, wd) -> ObjectiveData:
    return ObjectiveData(theta, Chunks(xc, yc, mc), jax.lax.psum(jnp.sum(mc), AXIS), wd)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _class_grads_sharded(f, K, mesh, theta, xc, yc, mc):
    def local(theta, xc, yc, mc):
        cnt = jnp.sum(
            jax.nn.one_hot(yc, K, dtype=theta.dtype) * mc[..., None].astype(theta.dtype), (0, 1)
        )
        cnt = jax.lax.psum(cnt, AXIS)
        return kernels.class_gradients(f, theta, Chunks(xc, yc, mc), jnp.maximum(cnt, 1.0), K, AXIS)

    return jax.shard_map(
        local, mesh=mesh, check_vma=False, in_specs=(P(), _DATA, _DATA, _DATA), out_specs=P()
    )(theta, xc, yc, mc)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _matvec_sharded(curv, mesh, V, theta, xc, yc, mc, wd):
    def local(V, theta, xc, yc, mc, wd):
        return jax.vmap(
            kernels.curvature_matvec(curv, _local_objective(theta, xc, yc, mc, wd), AXIS)
        )(V)

    return jax.shard_map(local, mesh=mesh, check_vma=False,
        in_specs=(P(), P(), _DATA, _DATA, _DATA, P()), out_specs=P())(V, theta, xc, yc, mc, wd)


@functools.partial(
    jax.jit, static_argnums=(0, 1, 2, 3), static_argnames=("layers", "layout", "ekfac")
)
def _solve_sharded(method, curv, mesh, max_steps, theta, xc, yc, mc, wd, G, damping, rtol, atol,
    factor_arrays=None, *, layers=None, layout=None, ekfac=True):
    def local(theta, xc, yc, mc, wd, G, damping, rtol, atol, factor_arrays):
        matvec = kernels.curvature_matvec(curv, _local_objective(theta, xc, yc, mc, wd), AXIS)
        if method == "dense":
            return linsolve.solve_dense(
                matvec, G, damping=damping, rtol=rtol, atol=atol, max_steps=max_steps
            )
        precond = None
        if factor_arrays is not None:  # the factors replicated: every device preconditions alike
            factors = kfac.Factors(layers, factor_arrays, layout, G.shape[-1], wd)
            precond = kfac.preconditioner(factors, damping, ekfac=ekfac)
        return linsolve.solve_cg(
            matvec, G, damping=damping, rtol=rtol, atol=atol, max_steps=max_steps, precond=precond
        )

    return jax.shard_map(local, mesh=mesh, check_vma=False,
        in_specs=(P(), _DATA, _DATA, _DATA) + (P(),) * 6, out_specs=P()
    )(theta, xc, yc, mc, wd, G, damping, rtol, atol, factor_arrays)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _lissa_sharded(curv, mesh, max_steps, theta, xc, yc, mc, wd, G, scale, damping, rtol, seed):
    def local(theta, xc, yc, mc, wd, G, scale, damping, rtol, seed):
        def batch_matvec(v, i):
            # the objective on minibatch i: every device's chunk i, summed over the devices
            c = jax.tree_util.tree_map(
                lambda a: jax.lax.dynamic_index_in_dim(a, i, 0), Chunks(xc, yc, mc)
            )
            d = ObjectiveData(theta, c, jnp.maximum(jax.lax.psum(jnp.sum(c.mask), AXIS), 1.0), wd)
            return kernels.curvature_matvec(curv, d, AXIS)(v)

        return linsolve.solve_lissa(batch_matvec, G, mc.shape[0], scale=scale, damping=damping,
            rtol=rtol, max_steps=max_steps, seed=seed)

    return jax.shard_map(local, mesh=mesh, check_vma=False,
        in_specs=(P(), _DATA, _DATA, _DATA) + (P(),) * 6, out_specs=P()
    )(theta, xc, yc, mc, wd, G, scale, damping, rtol, seed)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _influence_sharded(f, method, mesh, theta, U, xc, yc, mc):
    def local(theta, U, xc, yc, mc):
        n = jax.lax.psum(jnp.sum(mc), AXIS)
        return kernels.influence_rows(f, method, theta, U, Chunks(xc, yc, mc)) / n

    return jax.shard_map(local, mesh=mesh, check_vma=False,
        in_specs=(P(), P(), _DATA, _DATA, _DATA), out_specs=P(None, AXIS, None)
    )(theta, U, xc, yc, mc)


class Sharded:
    """The influence stages with the samples sharded over a one-axis mesh ("data"): the
    backend interface of `pareto_jax.backend` (same methods as `backend.Local`). Results are
    replicated, except the P rows, which come back for this process's samples."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def chunks(self, x, y, chunk_size: int, dtype) -> Chunks:
        return Chunks(*shard_chunks(self.mesh, x, y, chunk_size, dtype))

    def class_gradients(self, f, theta, chunks: Chunks, y, num_classes: int):
        return _class_grads_sharded(
            f, int(num_classes), self.mesh, replicate(self.mesh, theta), *chunks
        )

    def objective(self, theta, chunks: Chunks, n: int, weight_decay: float,
        mask=None) -> ObjectiveData:
        del n  # the sample count is psum-ed inside every product
        if mask is not None:
            checks.fail("select", "a subset of the parameters on a mesh",
                "every parameter on a mesh (the sharded products take no selection yet)",
                "run on one device (mesh=None); with K-FAC / EK-FAC on a model with parameters "
                "outside its Linear / Conv layers (a norm layer), or use solver='cg' on the mesh")
        dt = theta.dtype
        return ObjectiveData(
            replicate(self.mesh, theta), chunks, jnp.asarray(0, dt), jnp.asarray(weight_decay, dt)
        )

    execution = "compiled"

    def matvec(self, curv, data: ObjectiveData):
        """V (K, P) -> (H + λI) V, each product sharded."""
        return lambda V: _matvec_sharded(
            curv, self.mesh, V, data.theta, *data.chunks, data.weight_decay
        )

    def solve(self, method, curv, data, G, damping, rtol, atol, max_steps, *, factors=None,
        ekfac: bool = True) -> linsolve.SolveResult:
        """CG (preconditioned by replicated K-FAC/EK-FAC `factors` when given) or dense, every
        product sharded; the recurrences run replicated."""
        dt = data.theta.dtype
        G = replicate(self.mesh, jnp.asarray(G, dt))
        args = (method, curv, self.mesh, int(max_steps), data.theta, *data.chunks,
            data.weight_decay, G, jnp.asarray(damping, dt), jnp.asarray(rtol, dt),
            jnp.asarray(atol, dt))
        if factors is None:
            return _solve_sharded(*args)
        return _solve_sharded(*args, replicate(self.mesh, factors.factors), layers=factors.layers,
            layout=factors.layout, ekfac=ekfac)

    def lissa(
        self, curv, data, G, *, scale, damping, rtol, max_steps, seed
    ) -> linsolve.SolveResult:
        """LiSSA: each draw is one chunk index, the same chunk of every device's slice."""
        dt = data.theta.dtype
        return _lissa_sharded(curv, self.mesh, int(max_steps), data.theta, *data.chunks,
            data.weight_decay, replicate(self.mesh, jnp.asarray(G, dt)), jnp.asarray(scale, dt),
            jnp.asarray(damping, dt), jnp.asarray(rtol, dt), jnp.asarray(seed, jnp.uint32))

    def factors(self, model, params, x, y, *, batch_size, num_classes, output_loss, weight_decay,
        select=None, fisher, seed):
        """K-FAC / EK-FAC factors: their moments are streamed over this process's samples, which
        in a one-process job are all of them (a multi-process job would need the moments summed over
        processes, which is not implemented: refused)."""
        if jax.process_count() > 1:
            checks.fail("config.solver", "K-FAC / EK-FAC factors in a multi-process job",
                "one process (the factors' moments are not summed over processes)",
                "use solver='cg' (sharded products) in a multi-process job")
        return kfac.compute_factors(model, params, x, batch_size=batch_size,
            num_classes=num_classes, y=y, output_loss=output_loss, weight_decay=weight_decay,
            select=select, fisher=fisher, seed=seed)

    def influence_rows(self, f, method, theta, U, chunks: Chunks, n_real: int) -> np.ndarray:
        out = _influence_sharded(f, method, self.mesh, replicate(self.mesh, theta),
            replicate(self.mesh, jnp.asarray(U, theta.dtype)), *chunks)
        return local_rows(out, n_real)
