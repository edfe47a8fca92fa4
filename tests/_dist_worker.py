"""Run in a subprocess by test_distributed.py: XLA_FLAGS must be set before JAX starts.

    python tests/_dist_worker.py DEVICES OUT.json

Compares every sharded stage on a mesh of DEVICES (forced CPU) devices with the single-device
path in the same process and writes the maximum differences as JSON.
"""

import json
import os
import sys

D = int(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={D}"
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import _faults  # noqa: E402  (tests/ is this script's folder)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pareto_jax import data, distributed, influence, linsolve, models, search, train  # noqa: E402

_faults.plant()  # PARETO_JAX_FAULT, when tests/planted.py runs the distributed tests with a fault


def maxdiff(a, b):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return max(
        float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
        for x, y in zip(la, lb)
    )


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


out = {"devices_seen": jax.device_count()}
mesh = distributed.make_mesh(D)
s = data.stratified_split(data.load_digits(), seed=0)
x, y = s.train.x[:701].astype(np.float64), s.train.y[:701]  # 701: not a multiple of D
xv, yv = s.val.x.astype(np.float64), s.val.y
m = models.make_model("mlp", (64,), 10, hidden=(12,), seed=0)
apply, p0 = models.functional(m)
p0 = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), p0)
lf = models.per_sample_loss(apply)

# training: full batch must equal one device; minibatch on a 1-device mesh equals make_epoch_fn
full = train.TrainConfig(epochs=4, batch_size=None, optimizer="gd", learning_rate=0.5, seed=0)
a = train.train(lf, p0, x, y, full)
b = train.train(lf, p0, x, y, full, epoch_fn=distributed.make_epoch_fn(lf, full, len(y), mesh))
out["train_full_batch"] = maxdiff(a.params, b.params)
mini = train.TrainConfig(epochs=3, batch_size=64, learning_rate=0.01, seed=0)
a = train.train(lf, p0, x, y, mini)
b = train.train(lf, p0, x, y, mini, epoch_fn=distributed.make_epoch_fn(lf, mini, len(y), mesh))
out["train_minibatch"] = maxdiff(a.params, b.params)
out["train_minibatch_loss"] = [list(a.history), list(b.history)]
w = np.random.default_rng(0).uniform(0, 2, len(y))
a = train.train(lf, p0, x, y, full, weights=w)
b = train.train(
    lf, p0, x, y, full, weights=w, epoch_fn=distributed.make_epoch_fn(lf, full, len(y), mesh)
)
out["train_weighted"] = maxdiff(a.params, b.params)
params = train.train(lf, p0, x, y, mini).params

# class gradients, HVP, CG, P (both paths)
G1 = influence.class_gradients(lf, params, xv, yv, 10, chunk_size=50)
GD = influence.class_gradients(lf, params, xv, yv, 10, mesh=mesh, chunk_size=50)
out["class_gradients"] = rel(GD, G1)
hvp1, theta = influence.make_hvp(lf, params, x, y, weight_decay=1e-3, batch_size=100)
hvpD, _ = influence.make_hvp(lf, params, x, y, mesh=mesh, weight_decay=1e-3, batch_size=100)
v = jax.random.normal(jax.random.PRNGKey(1), theta.shape, theta.dtype)
out["hvp"] = rel(hvpD(v), hvp1(v))
# (the Hessian is indefinite here: the damping may be raised, warned, identically on both paths)
cfg = influence.InfluenceConfig(curvature="hessian", damping=1e-3, hvp_batch_size=100,
    chunk_size=64, rtol=1e-10, escalate_damping=True)
r1 = influence.category_influence(
    lf, params, x, y, xv, yv, num_classes=10, weight_decay=1e-3, config=cfg
)
rD = influence.category_influence(
    lf, params, x, y, xv, yv, num_classes=10, weight_decay=1e-3, config=cfg, mesh=mesh
)
out["cg_solutions"] = rel(rD.solutions, r1.solutions)
out["cg_steps"] = [np.asarray(r1.steps).tolist(), np.asarray(rD.steps).tolist()]
dense = linsolve.solve_dense(hvp1, G1, damping=rD.damping)
out["damping"] = [r1.damping, rD.damping, list(rD.escalations)]
out["cg_vs_dense"] = rel(rD.solutions, dense.value)
out["P_jvp"] = rel(rD.P, r1.P)
out["P_shape"] = list(rD.P.shape)
Pps = influence.influence_from_solutions(
    lf, params, r1.solutions, x, y, mesh=mesh, method="per_sample", chunk_size=30
)
out["P_per_sample"] = rel(Pps, r1.P)
rg1 = influence.category_influence(lf, params, x, y, xv, yv, num_classes=10, weight_decay=1e-3,
    apply=apply,
    config=influence.InfluenceConfig(curvature="gauss_newton", damping=1e-4, rtol=1e-10))
rgD = influence.category_influence(lf, params, x, y, xv, yv, num_classes=10, weight_decay=1e-3,
    apply=apply,
    config=influence.InfluenceConfig(curvature="gauss_newton", damping=1e-4, rtol=1e-10), mesh=mesh)
out["P_gauss_newton"] = rel(rgD.P, rg1.P)

# the search: the population sharded over the mesh gives the same candidates and fitness
lin_apply, lp = models.functional(models.make_model("linear", (64,), 10))
llf = models.per_sample_loss(lin_apply)
tc = train.TrainConfig(epochs=5, batch_size=128, learning_rate=0.01, weight_decay=1e-3)
st = train.train(llf, lp, s.train.x, s.train.y, tc).state
prob = search.SearchProblem(
    llf, lin_apply, st, tc, s.train.x, s.train.y, s.val.x, s.val.y, s.test.x, s.test.y, 10
)
P = np.asarray(
    influence.linear_category_influence(
        st.params, s.train.x, s.train.y, s.val.x, s.val.y, num_classes=10, weight_decay=1e-3
    ).P
)
sc = search.SearchConfig(population=6, generations=2, seed=0)
a = search.run_search(prob, P, [3, 8], config=sc)
b = search.run_search(prob, P, [3, 8], config=sc, mesh=mesh)
fa = [c.fitness for c in a.evaluations]
fb = [c.fitness for c in b.evaluations]
out["search_same_genomes"] = all(
    np.array_equal(c.genome, d.genome) for c, d in zip(a.evaluations, b.evaluations)
)
out["search_fitness"] = max((0.0 if (p == q) else abs(p - q)) for p, q in zip(fa, fb))
out["search_n"] = [len(fa), len(fb)]
json.dump(out, open(sys.argv[2], "w"), indent=1)
print(json.dumps(out))
