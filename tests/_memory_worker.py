"""Peak memory of the influence pipeline at one N (run in a fresh process per N).

    python tests/_memory_worker.py N OUT.json [--hidden H]

Random data (d = 64, K = 10) and an MLP 64-H-10: class gradients, Gauss-Newton CG (a few steps)
and the jvp P stage, all through `category_influence`. Reports the process's peak RSS before and
after, and XLA's compiled temp/argument/output sizes of the P stage and of the solve, which
depend on the chunk sizes and P, not on N (N only enters through the input and the N×K output).
"""

import json
import resource
import sys
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pareto_jax import backend, influence, kernels, models  # noqa: E402

N = int(sys.argv[1])
H = int(sys.argv[sys.argv.index("--hidden") + 1]) if "--hidden" in sys.argv else 512
rng = np.random.default_rng(0)
x = rng.normal(size=(N, 64)).astype(np.float32)
y = rng.integers(0, 10, N)
xv = rng.normal(size=(500, 64)).astype(np.float32)
yv = np.arange(500) % 10
apply, params = models.functional(models.make_model("mlp", (64,), 10, hidden=(H,), seed=0))
lf = models.per_sample_loss(apply)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = influence.InfluenceConfig(curvature="gauss_newton", damping=1e-2, max_steps=3, rtol=1e-3,
    chunk_size=256, hvp_batch_size=1024, method="jvp")
r = influence.category_influence(
    lf, params, x, y, xv, yv, num_classes=10, weight_decay=1e-3, apply=apply, config=cfg
)
r.P.block_until_ready()
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

flat = kernels.flatten(lf, params)
theta = flat.theta
local = backend.Local()
chunks = local.chunks(x, y, cfg.chunk_size, theta.dtype)
lowered = backend.influence_rows_program.lower(flat.loss, "jvp", theta, r.solutions, chunks, N)
mP = lowered.compile().memory_analysis()
curv = kernels.Curvature(flat.loss, kernels.flat_logits(apply, params), "gauss_newton")
data = local.objective(theta, local.chunks(x, y, cfg.hvp_batch_size, theta.dtype), N, 1e-3)
G = jnp.zeros((10, theta.size), theta.dtype)
one = jnp.asarray(1e-2, theta.dtype)
mS = backend.solve_program.lower("cg", curv, data, G, one, one, one, 3).compile().memory_analysis()
out = {"N": N, "num_params": int(theta.size), "rss_before_MiB": rss0 / 1024,
    "rss_peak_MiB": rss1 / 1024, "P_stage_temp_MiB": mP.temp_size_in_bytes / 2**20,
    "P_stage_output_MiB": mP.output_size_in_bytes / 2**20,
    "solve_temp_MiB": mS.temp_size_in_bytes / 2**20,
    "N_by_P_gradients_MiB": N * theta.size * 4 / 2**20}
json.dump(out, open(sys.argv[2], "w"))
print(json.dumps(out))
