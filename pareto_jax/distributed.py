"""Data-parallel execution over a device mesh (`jax.sharding`), on one host or many.

Everything here is JAX's own distributed machinery: a one-axis `Mesh` named ``"data"``,
`NamedSharding` to place arrays, `jax.shard_map` to run the single-device code on each device's
slice, and `psum` to reduce. The numerics are the functions of `kernels` and `train` (called
with ``axis_name="data"``); only the placement differs, so results equal the single-device path
up to float summation order. `sharded.Sharded` is the influence backend that `pareto_jax.influence`
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

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import checks, kernels, train

AXIS = "data"
_initialized = False


# ----------------------------------------------------------------------------- mesh and hosts


def _env_int(name: str, least: int) -> int:
    value = os.environ[name]
    try:
        out = int(value)
    except ValueError:
        out = least - 1
    if out < least:
        checks.fail(name, repr(value), f"an integer >= {least}", f"set {name} to e.g. {least + 1}")
    return out


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
    process_id: int | None = None, local_device_ids=None, **kwargs) -> dict:
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
        num_processes = _env_int("PARETO_JAX_NUM_PROCESSES", 1)
    if process_id is None and "PARETO_JAX_PROCESS_ID" in env:
        process_id = _env_int("PARETO_JAX_PROCESS_ID", 0)
    if not _initialized:
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
            try:
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            except Exception:  # noqa: BLE001 - option absent in some jaxlib builds
                pass
        try:
            jax.distributed.initialize(coordinator_address=coordinator_address,
                num_processes=num_processes, process_id=process_id,
                local_device_ids=local_device_ids, **kwargs)
        except (ValueError, RuntimeError) as e:  # no cluster detected, or a bad address
            checks.fail(
                "distributed",
                f"no multi-process job to join ({e})",
                "a cluster JAX detects (TPU pod slice, SLURM, Open MPI) or a coordinator",
                "set PARETO_JAX_COORDINATOR=host:port, PARETO_JAX_NUM_PROCESSES and "
                "PARETO_JAX_PROCESS_ID (or pass them to distributed.initialize), or run "
                "without --distributed on one host",
            )
        _initialized = True
    return {"process_index": jax.process_index(), "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(), "devices": jax.device_count()}


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


# Every shard_map here uses check_vma=False and reduces with explicit psums: with the check on,
# differentiating w.r.t. replicated params inserts its own psum, which would count twice.


# ----------------------------------------------------------------------------- training


def make_epoch_fn(loss_fn, config: train.TrainConfig, n: int, mesh: Mesh, *, remat: bool = False):
    """Data-parallel `train.make_epoch_fn`: same signature, the samples sharded over `mesh`.

    ``epoch(params, opt_state, x, y, w, epoch_index)`` takes the n samples (anywhere); inside
    one jitted program they are padded to D·m and sharded, and `train.epoch_fns(...).body` runs on
    each device's m samples: ⌈b/D⌉ samples of every minibatch drawn from its own slice, shuffled
    with ``fold_in(fold_in(seed, epoch), device)`` (one device reproduces `train.make_epoch_fn`'s
    batch order). Gradients and the loss are `psum`-ed; the update is replicated. Full batch
    (``batch_size=None``) gives the single-device result. `remat`: each step rematerialised under
    reverse mode (see `train.epoch_fns`).
    """
    D = _size(mesh)
    m = -(-n // D)
    nb, b_glob = train.batches_per_epoch(n, config.batch_size)
    bd = m if nb == 1 else -(-b_glob // D)
    body = train.epoch_fns(
        loss_fn, config, m, -(-m // bd), bd, axis_name=AXIS, num_devices=D, remat=remat
    ).body

    def local_epoch(params, opt_state, x, y, w, msk, epoch_index):
        return body(params, opt_state, x[0], y[0], w[0], msk[0], epoch_index)

    sm = jax.shard_map(local_epoch, mesh=mesh, check_vma=False,
        in_specs=(P(), P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P()), out_specs=(P(), P(), P()))

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
    return {"devices": _size(mesh), "platform": mesh.devices.flat[0].platform,
        "processes": jax.process_count(), "axis": AXIS,
        "per_process": math.ceil(_size(mesh) / jax.process_count())}
