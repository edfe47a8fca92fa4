"""Data-parallel execution over a device mesh (`jax.sharding`), on one host or many.

Everything here is JAX's own distributed machinery: a one-axis `Mesh` named ``"data"``,
`NamedSharding` to place arrays, `jax.shard_map` to run the single-device code on each device's
slice, and `psum` to reduce. The numerics are the functions of `kernels` and `train` (called
with ``axis_name="data"``); only the placement differs, so results equal the single-device path
up to float summation order. `Sharded` is the influence backend that `pareto_jax.influence`
uses when given a mesh.

Layout of a sample set (training or validation). n samples are padded and reshaped to
``(num_chunks, D·c, ...)`` and sharded ``P(None, "data")``: device d holds columns [d·c, (d+1)·c)
of every chunk (c samples) and loops over its chunks. Per device, memory is its slice of the data
and of the N×K output plus one chunk's work; nothing of size N×P is ever formed.

What runs sharded:

* class gradients: local VJP sums, `psum` (the class counts too);
* HVPs inside CG: each device accumulates its chunks, `psum`; the CG recurrences on (K, P)
  vectors run replicated, so every device holds the same solution;
* the influence matrix (jvp and per-sample paths): local chunks, output sharded like the input;
* weighted training (`make_epoch_fn`): each device draws its share of every minibatch from its
  own slice, gradients are `psum`-ed, the optimizer update is replicated. Full-batch training is
  identical to one device; with minibatches the batch *composition* depends on the device count
  (each device shuffles its own slice), so results agree statistically, not bitwise;
* the search population (`shard_population`): candidates are independent, so the population
  axis is sharded and XLA partitions the vmapped epoch with no communication.

Multi-host (TPU pod slices, multi-node GPU): call `initialize()` in every process before any other
JAX call, build the mesh over all devices (`make_mesh()`), and give every function here the
*process-local* samples (e.g. ``x[process_slice(len(x))]``). Arrays are assembled with
`jax.make_array_from_process_local_data`, and each process gets back the rows of P for its own
samples. On a TPU pod slice run the same script on every host (``gcloud compute tpus tpu-vm ssh
NAME --worker=all --command="python job.py"``); `initialize()` then needs no arguments.
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import checks, kernels, kfac, linsolve, train
from .kernels import Chunks, ObjectiveData

AXIS = "data"
_initialized = False


# ----------------------------------------------------------------------------- mesh and hosts


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
    **kwargs,
) -> dict:
    """Join a multi-process JAX job (`jax.distributed.initialize`); call it first, once.

    With no arguments JAX detects the cluster (TPU pod slices, SLURM, Open MPI). Otherwise give
    the coordinator's ``host:port``, the number of processes and this process's id (also read from
    ``PARETO_JAX_COORDINATOR``, ``PARETO_JAX_NUM_PROCESSES`` and ``PARETO_JAX_PROCESS_ID``).
    Calling it again is a no-op. On CPU, collectives across processes use gloo.

    Returns:
        {"process_index", "process_count", "local_devices", "devices"}.
    """
    global _initialized
    env = os.environ
    coordinator_address = coordinator_address or env.get("PARETO_JAX_COORDINATOR")
    if num_processes is None and "PARETO_JAX_NUM_PROCESSES" in env:
        num_processes = int(env["PARETO_JAX_NUM_PROCESSES"])
    if process_id is None and "PARETO_JAX_PROCESS_ID" in env:
        process_id = int(env["PARETO_JAX_PROCESS_ID"])
    if not _initialized:
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
            try:
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            except Exception:  # noqa: BLE001 - option absent in some jaxlib builds
                pass
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
            **kwargs,
        )
        _initialized = True
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": jax.device_count(),
    }


def make_mesh(num_devices: int | None = None, *, devices=None) -> Mesh:
    """A one-axis mesh named "data" over `num_devices` devices (default: all, every process's).

    On one CPU host, more devices are emulated with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before JAX starts; they share the
    host's cores).
    """
    devs = list(jax.devices() if devices is None else devices)
    if num_devices is not None:
        checks.check_positive(num_devices, "num_devices", integer=True)
        if num_devices > len(devs):
            checks.fail(
                "num_devices",
                num_devices,
                f"at most {len(devs)} (the devices JAX sees)",
                "lower it, or on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N "
                "before starting Python",
            )
        devs = devs[:num_devices]
    return Mesh(np.asarray(devs), (AXIS,))


def mesh_from_setting(setting) -> Mesh | None:
    """The mesh a config asks for: None/0/1 -> None (single device), "all" or n -> a mesh."""
    if setting in (None, 0, 1, "1", "none"):
        return None
    if setting == "all":
        return make_mesh()
    return make_mesh(int(setting))


def process_slice(
    n: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """The contiguous block of n samples this process loads in a multi-host job."""
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    per = -(-n // pc)
    return slice(min(pi * per, n), min((pi + 1) * per, n))


def _size(mesh: Mesh) -> int:
    return int(mesh.shape[AXIS])


def _local_size(mesh: Mesh) -> int:
    pi = jax.process_index()
    return sum(1 for d in mesh.devices.flat if d.process_index == pi)


def _max_over_processes(v: int) -> int:
    if jax.process_count() == 1:
        return v
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([v]))))


# ----------------------------------------------------------------------------- placement


def shard_chunks(mesh: Mesh, x, y, chunk_size: int, dtype=None):
    """Pad, chunk and place (process-local) samples: (xc, yc, mc) sharded ``P(None, "data")``.

    Each chunk holds ``chunk_size`` samples rounded up to a multiple of the device count;
    padded slots have mask 0. Returns the three global arrays.
    """
    D, Dl = _size(mesh), _local_size(mesh)
    c = max(1, -(-int(chunk_size) // D))
    wl = Dl * c
    n = kernels.num_samples(x)
    nc = _max_over_processes(max(1, -(-n // wl)))
    pad = nc * wl - n
    m = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])

    def padded(a, cast):
        a = np.asarray(a)
        if pad:
            fill = a[:1] if n else np.zeros((1, *a.shape[1:]), a.dtype)
            a = np.concatenate([a, np.repeat(fill, pad, 0)])
        return (
            a.astype(dtype)
            if cast and dtype is not None and np.issubdtype(a.dtype, np.floating)
            else a
        )

    x = jax.tree_util.tree_map(lambda a: padded(a, True), x)
    y = jax.tree_util.tree_map(lambda a: padded(a, False), y)
    if dtype is not None:
        m = m.astype(dtype)
    sh = NamedSharding(mesh, P(None, AXIS))

    def put(a):
        local = a.reshape(nc, wl, *a.shape[1:])
        return jax.make_array_from_process_local_data(sh, local, (nc, D * c, *a.shape[1:]))

    return jax.tree_util.tree_map(put, x), jax.tree_util.tree_map(put, y), put(m)


def local_rows(arr: jax.Array, n_local: int) -> np.ndarray:
    """This process's rows of a (num_chunks, width, K) array sharded like `shard_chunks`."""
    if jax.process_count() == 1:
        a = np.asarray(arr)
    else:
        shards = sorted(arr.addressable_shards, key=lambda s: s.index[1].start or 0)
        a = np.concatenate([np.asarray(s.data) for s in shards], axis=1)
    return a.reshape(-1, *a.shape[2:])[:n_local]


def replicate(mesh: Mesh, tree):
    """Place a pytree fully replicated on the mesh (params, solutions, optimizer state)."""
    sh = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda a: jax.device_put(jnp.asarray(a), sh), tree)


# ----------------------------------------------------------------------------- influence stages


_DATA = P(None, AXIS)
# Every shard_map here uses check_vma=False and reduces with explicit psums: with the check on,
# differentiating w.r.t. replicated params inserts its own psum, which would count twice.


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

    return jax.shard_map(
        local,
        mesh=mesh,
        check_vma=False,
        in_specs=(P(), P(), _DATA, _DATA, _DATA, P()),
        out_specs=P(),
    )(V, theta, xc, yc, mc, wd)


@functools.partial(
    jax.jit, static_argnums=(0, 1, 2, 3), static_argnames=("layers", "layout", "ekfac")
)
def _solve_sharded(
    method,
    curv,
    mesh,
    max_steps,
    theta,
    xc,
    yc,
    mc,
    wd,
    G,
    damping,
    rtol,
    atol,
    factor_arrays=None,
    *,
    layers=None,
    layout=None,
    ekfac=True,
):
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

    return jax.shard_map(
        local,
        mesh=mesh,
        check_vma=False,
        in_specs=(P(), _DATA, _DATA, _DATA) + (P(),) * 6,
        out_specs=P(),
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

        return linsolve.solve_lissa(
            batch_matvec,
            G,
            mc.shape[0],
            scale=scale,
            damping=damping,
            rtol=rtol,
            max_steps=max_steps,
            seed=seed,
        )

    return jax.shard_map(
        local,
        mesh=mesh,
        check_vma=False,
        in_specs=(P(), _DATA, _DATA, _DATA) + (P(),) * 6,
        out_specs=P(),
    )(theta, xc, yc, mc, wd, G, scale, damping, rtol, seed)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _influence_sharded(f, method, mesh, theta, U, xc, yc, mc):
    def local(theta, U, xc, yc, mc):
        n = jax.lax.psum(jnp.sum(mc), AXIS)
        return kernels.influence_rows(f, method, theta, U, Chunks(xc, yc, mc)) / n

    return jax.shard_map(
        local,
        mesh=mesh,
        check_vma=False,
        in_specs=(P(), P(), _DATA, _DATA, _DATA),
        out_specs=P(None, AXIS, None),
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

    def objective(self, theta, chunks: Chunks, n: int, weight_decay: float) -> ObjectiveData:
        del n  # the sample count is psum-ed inside every product
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

    def solve(
        self,
        method,
        curv,
        data,
        G,
        damping,
        rtol,
        atol,
        max_steps,
        *,
        factors=None,
        ekfac: bool = True,
    ) -> linsolve.SolveResult:
        """CG (preconditioned by replicated K-FAC/EK-FAC `factors` when given) or dense, every
        product sharded; the recurrences run replicated."""
        dt = data.theta.dtype
        G = replicate(self.mesh, jnp.asarray(G, dt))
        args = (
            method,
            curv,
            self.mesh,
            int(max_steps),
            data.theta,
            *data.chunks,
            data.weight_decay,
            G,
            jnp.asarray(damping, dt),
            jnp.asarray(rtol, dt),
            jnp.asarray(atol, dt),
        )
        if factors is None:
            return _solve_sharded(*args)
        return _solve_sharded(
            *args,
            replicate(self.mesh, factors.factors),
            layers=factors.layers,
            layout=factors.layout,
            ekfac=ekfac,
        )

    def lissa(
        self, curv, data, G, *, scale, damping, rtol, max_steps, seed
    ) -> linsolve.SolveResult:
        """LiSSA: each draw is one chunk index, the same chunk of every device's slice."""
        dt = data.theta.dtype
        return _lissa_sharded(
            curv,
            self.mesh,
            int(max_steps),
            data.theta,
            *data.chunks,
            data.weight_decay,
            replicate(self.mesh, jnp.asarray(G, dt)),
            jnp.asarray(scale, dt),
            jnp.asarray(damping, dt),
            jnp.asarray(rtol, dt),
            jnp.asarray(seed, jnp.uint32),
        )

    def factors(self, model, params, x, y, *, batch_size, num_classes, output_loss, weight_decay):
        """K-FAC / EK-FAC factors: their moments are streamed over this process's samples, which
        in a one-process job are all of them (a multi-process job would need the moments summed over
        processes, which is not implemented: refused)."""
        if jax.process_count() > 1:
            checks.fail(
                "config.solver",
                "K-FAC / EK-FAC factors in a multi-process job",
                "one process (the factors' moments are not summed over processes)",
                "use solver='cg' (sharded products) in a multi-process job",
            )
        return kfac.compute_factors(
            model,
            params,
            x,
            batch_size=batch_size,
            num_classes=num_classes,
            y=y,
            output_loss=output_loss,
            weight_decay=weight_decay,
        )

    def influence_rows(self, f, method, theta, U, chunks: Chunks, n_real: int) -> np.ndarray:
        out = _influence_sharded(
            f,
            method,
            self.mesh,
            replicate(self.mesh, theta),
            replicate(self.mesh, jnp.asarray(U, theta.dtype)),
            *chunks,
        )
        return local_rows(out, n_real)


# ----------------------------------------------------------------------------- training


def make_epoch_fn(loss_fn, config: train.TrainConfig, n: int, mesh: Mesh):
    """Data-parallel `train.make_epoch_fn`: same signature, the samples sharded over `mesh`.

    ``epoch(params, opt_state, x, y, w, epoch_index)`` takes the n samples (anywhere); inside
    one jitted program they are padded to D·m and sharded, and `train.epoch_fns(...).body` runs on
    each
    device's m samples: ⌈b/D⌉ samples of every minibatch drawn from its own slice, shuffled with
    ``fold_in(fold_in(seed, epoch), device)`` (one device reproduces `train.make_epoch_fn`'s
    batch order). Gradients and the loss are `psum`-ed; the update is replicated. Full batch
    (``batch_size=None``) gives the single-device result.
    """
    D = _size(mesh)
    m = -(-n // D)
    nb, b_glob = train.batches_per_epoch(n, config.batch_size)
    bd = m if nb == 1 else -(-b_glob // D)
    body = train.epoch_fns(loss_fn, config, m, -(-m // bd), bd, axis_name=AXIS, num_devices=D).body

    def local_epoch(params, opt_state, x, y, w, msk, epoch_index):
        return body(params, opt_state, x[0], y[0], w[0], msk[0], epoch_index)

    sm = jax.shard_map(
        local_epoch,
        mesh=mesh,
        check_vma=False,
        in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P()),
        out_specs=(P(), P(), P()),
    )

    def epoch(params, opt_state, x, y, w, epoch_index):
        pad = D * m - n
        msk = jnp.concatenate([jnp.ones((n,), w.dtype), jnp.zeros((pad,), w.dtype)])
        if pad:
            x = jnp.concatenate([x, jnp.repeat(x[:1], pad, 0)])
            y = jnp.concatenate([y, jnp.repeat(y[:1], pad, 0)])
            w = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)])
        shp = lambda a: a.reshape(D, m, *a.shape[1:])  # noqa: E731
        return sm(params, opt_state, shp(x), shp(y), shp(w), shp(msk), epoch_index)

    return jax.jit(epoch)


# ----------------------------------------------------------------------------- population


def shard_population(mesh: Mesh, W) -> tuple[jax.Array, int]:
    """Place a (population, N) weight matrix with the population axis sharded over `mesh`.

    The population is padded (with copies of its first row) to a multiple of the device count;
    returns (placed array, original population size). A `vmap`-ed epoch or program solve over
    this axis is then partitioned by XLA with no communication between devices.
    """
    W = np.asarray(W)
    D = _size(mesh)
    npop = W.shape[0]
    pad = (-npop) % D
    if pad:
        W = np.concatenate([W, np.repeat(W[:1], pad, 0)])
    return jax.device_put(W, NamedSharding(mesh, P(AXIS))), npop


def describe(mesh: Mesh | None) -> dict:
    """A JSON-able summary of where a run executes."""
    if mesh is None:
        d = jax.devices()[0]
        return {"devices": 1, "platform": d.platform, "processes": jax.process_count()}
    return {
        "devices": _size(mesh),
        "platform": mesh.devices.flat[0].platform,
        "processes": jax.process_count(),
        "axis": AXIS,
        "per_process": math.ceil(_size(mesh) / jax.process_count()),
    }
