"""One process of a 2-process CPU job (run by test_distributed.py).

    python tests/_multihost_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json

Each process has 2 forced CPU devices, joins the job through `distributed.initialize`, loads its
own block of the training set (`process_slice`), and computes P on a mesh over all 4 devices.
It writes its rows of P and the (replicated) CG solutions.
"""

import json
import os
import sys

pid, nproc, port, out_path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pareto_jax import data, distributed, influence, models  # noqa: E402

info = distributed.initialize(f"localhost:{port}", nproc, pid)
s = data.stratified_split(data.load_digits(), seed=0)
x, y = s.train.x[:501].astype(np.float64), s.train.y[:501]
sl = distributed.process_slice(len(y))
apply, params = models.functional(models.make_model("mlp", (64,), 10, hidden=(8,), seed=0))
params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
lf = models.per_sample_loss(apply)
mesh = distributed.make_mesh()
vs = distributed.process_slice(len(s.val.y))
cfg = influence.InfluenceConfig(
    curvature="gauss_newton", damping=1e-3, rtol=1e-10, chunk_size=32, hvp_batch_size=64
)
r = influence.category_influence(lf, params, x[sl], y[sl], s.val.x[vs], s.val.y[vs], num_classes=10,
    weight_decay=1e-3, apply=apply, config=cfg, mesh=mesh)
json.dump(
    {"info": info, "slice": [sl.start, sl.stop], "P": np.asarray(r.P).tolist(),
        "U": np.asarray(r.solutions).tolist()},
    open(out_path, "w"),
)
print("done", info)
