"""Peak memory of influence from a batch source at one N (a fresh process per N).

    python tests/_stream_worker.py N OUT.json

The training set (d = 512, K = 10) is generated batch by batch from per-batch seeds and never
held whole; an MLP 512-32-10, Gauss-Newton CG (3 steps), the jvp P stage.
"""

import json
import resource
import sys
import warnings

warnings.filterwarnings("ignore", message="JAXopt is no longer maintained")
import numpy as np  # noqa: E402

from pareto_jax import influence, models  # noqa: E402

N, B = int(sys.argv[1]), 1000


def batches():
    for b in range(0, N, B):
        rng = np.random.default_rng(b)
        m = min(B, N - b)
        yield rng.random((m, 512), np.float32) - 0.5, rng.integers(0, 10, m)


rng = np.random.default_rng(0)
xv = rng.random((500, 512), np.float32) - 0.5
yv = np.arange(500) % 10
apply, params = models.functional(models.make_model("mlp", (512,), 10, hidden=(32,), seed=0))
lf = models.per_sample_loss(apply)
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = influence.InfluenceConfig(curvature="gauss_newton", damping=1e-2, max_steps=3, rtol=1e-3,
    chunk_size=512, hvp_batch_size=1024, method="jvp")
r = influence.category_influence(
    lf, params, batches, None, xv, yv, num_classes=10, weight_decay=1e-3, config=cfg
)
r.P.block_until_ready()
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = {"N": N, "rss_before_MiB": rss0 / 1024, "rss_peak_MiB": rss1 / 1024,
    "P_shape": list(r.P.shape), "x_in_memory_MiB": N * 512 * 4 / 2**20,
    "execution": r.details["execution"]}
json.dump(out, open(sys.argv[2], "w"))
print(json.dumps(out))
