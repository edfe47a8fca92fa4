"""Where our EK-FAC's time goes on `bench_deep`'s networks: the factors alone (two streamed
passes; the exact class expectation is K backward passes per batch per pass, the sampled Fisher
one), the whole influence call (factors, class gradients, per-sample gradients and the
preconditioned products), and the backend compile time JAX reports on the first and second call.

    python -m bench.profile_ekfac resnet,transformer

Writes bench/results/profile_ekfac.json.
"""

from __future__ import annotations

import sys
import time

import numpy as np
from jax import monitoring

from bench import _util
from bench import bench_deep as b

EVENTS: list = []
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **kw: EVENTS.append((name, secs)))


def _compile_seconds() -> tuple[float, int]:
    done = [s for n, s in EVENTS if n.endswith("backend_compile_duration")]
    return float(sum(done)), len(done)


def profile(kind: str) -> dict:
    from pareto_jax import influence, kfac

    st = b._setup(kind, 3000, 15)
    wd, s = st["cfg"].weight_decay, st["s"]
    kw = dict(num_classes=st["K"], weight_decay=wd, apply=st["apply"], model=st["m"])
    select = kfac.default_selection(st["m"], st["params"], st["xt"][:1])[0]
    rows = {}
    for fisher in ("expected", "sampled"):
        cfg = influence.InfluenceConfig(solver="ekfac", damping=1e-3 - wd, fisher=fisher)
        for call in ("first", "second"):
            EVENTS.clear()
            t0 = time.perf_counter()
            f = kfac.compute_factors(st["m"], st["params"], st["xt"], num_classes=st["K"],
                weight_decay=wd, fisher=fisher, select=select)
            np.asarray(f.factors[0].lam_ekfac)
            t_f = time.perf_counter() - t0
            c_f, _ = _compile_seconds()
            EVENTS.clear()
            t0 = time.perf_counter()
            r = influence.category_influence(st["lf"], st["params"], st["xt"], st["yt"], s.val.x,
                s.val.y, config=cfg, **kw)
            np.asarray(r.P)
            t_all = time.perf_counter() - t0
            c_all, n_c = _compile_seconds()
            row = dict(factors_s=t_f, factors_compile_s=c_f, total_s=t_all,
                total_compile_s=c_all, programs_compiled=n_c)
            rows[f"{fisher} {call}"] = row
            print(kind, fisher, call, {k: round(v, 2) for k, v in row.items()}, flush=True)
    return rows


def main():
    kinds = (sys.argv[1] if len(sys.argv) > 1 else "resnet,transformer").split(",")
    out = {kind: profile(kind) for kind in kinds}
    print(f"wrote {_util.write('profile_ekfac', {'machine': _util.machine(), **out})}")


if __name__ == "__main__":
    main()
