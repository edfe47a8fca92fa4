"""The influence result: P with how it was obtained, its regions, and its file format."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np

from .. import checks, io
from ..results import pytree_result

JOINT_POSITIVE, TRADE_OFF, JOINT_NEGATIVE = 1, 0, -1
REGION_NAMES = {JOINT_POSITIVE: "joint-positive", TRADE_OFF: "trade-off",
    JOINT_NEGATIVE: "joint-negative"}

_ARRAYS = ("P", "steps", "residual", "converged", "negative_curvature", "status", "solutions",
    "sample_ids")


@pytree_result(data=_ARRAYS)
@dataclasses.dataclass(frozen=True)
class InfluenceResult:
    """The influence matrix and how it was obtained (a pytree: its arrays are the leaves).

    Attributes:
        P: (N, K) category-wise influence (P > 0 beneficial); K classes, or groups when the
            validation set was partitioned by `groups=`.
        method: "jvp", "per_sample" or "closed_form".
        solver, curvature: what computed the inverse-HVPs.
        damping: the damping δ finally used (after any escalation), on top of the objective's λ.
        escalations: damping values tried before, with the reason.
        steps, residual, converged, negative_curvature, status: per-class solve diagnostics
            (`status`: `results.Status` codes).
        solutions: the K inverse-HVP solutions U (K, P), flat.
        details: method-specific diagnostics (e.g. LiSSA's scale and λ_max).
        names: the K column names (class or group names), or None.
        sample_ids: (N,) ids of the training samples (the rows), or None.

    `save(path)` writes one ``.npz`` with plain keys (``P``, ``solutions``, ``names``,
    ``sample_ids``, the diagnostics, and ``meta`` as JSON); `InfluenceResult.load(path)` reads it
    back and checks it.

    Example:
        >>> import os, tempfile
        >>> import numpy as np
        >>> from pareto_jax import InfluenceResult, linear_category_influence, data, models, train
        >>> s = data.stratified_split(data.make_disks("separable", n_per_class=40), seed=0)
        >>> apply, params = models.functional(models.make_model("linear", (2,), 2))
        >>> params = train.train(models.per_sample_loss(apply), params, s.train.x, s.train.y).params
        >>> r = linear_category_influence(params, s.train.x, s.train.y, s.val.x, s.val.y,
        ...                               num_classes=2, weight_decay=1e-3)
        >>> path = r.save(os.path.join(tempfile.mkdtemp(), "P.npz"))
        >>> bool(np.array_equal(InfluenceResult.load(path).P, r.P)), r.summary()["n_train"]
        (True, 48)
    """

    P: jax.Array
    method: str
    solver: str
    curvature: str
    damping: float
    escalations: tuple
    steps: np.ndarray
    residual: np.ndarray
    converged: np.ndarray
    negative_curvature: np.ndarray
    status: np.ndarray | None = None
    solutions: jax.Array | None = None
    details: dict = dataclasses.field(default_factory=dict)
    names: tuple | None = None
    sample_ids: np.ndarray | None = None

    @property
    def regions(self) -> np.ndarray:
        return influence_regions(self.P)

    def summary(self) -> dict:
        reg = self.regions
        return {"n_train": int(self.P.shape[0]), "num_classes": int(self.P.shape[1]),
            "method": self.method, "solver": self.solver, "curvature": self.curvature,
            "damping": float(self.damping), "escalations": list(self.escalations),
            "cg_steps": np.asarray(self.steps).tolist(),
            "relative_residual": np.asarray(self.residual).tolist(),
            "converged": bool(np.all(self.converged)),
            "regions": {REGION_NAMES[r]: int((reg == r).sum()) for r in REGION_NAMES},
            **({"names": list(self.names)} if self.names is not None else {}),
            **({"details": self.details} if self.details else {})}

    def save(self, path) -> str:
        """Write the result to ``path`` (``.npz``, atomically; see the class docstring). Returns
        the path."""
        path = str(path)
        arrays = {k: getattr(self, k) for k in _ARRAYS if getattr(self, k) is not None}
        if self.names is not None:
            arrays["names"] = [str(n) for n in self.names]
        meta = {"method": self.method, "solver": self.solver, "curvature": self.curvature,
            "damping": float(self.damping), "escalations": self.escalations, "details": self.details
        }
        arrays["meta"] = json.dumps(io.to_jsonable(meta), default=str)
        io.save_arrays(path, arrays)
        return path

    @classmethod
    def load(cls, path) -> "InfluenceResult":
        """Read a result written by `save` (P and solutions come back as device arrays). The file
        is checked: a 2-D finite P, names and ids of matching length, per-class diagnostics."""
        z = io.load_arrays(path)
        if "P" not in z or "meta" not in z:
            checks.fail("path", f"{path} with keys {sorted(z)}",
                "a file written by InfluenceResult.save", "save the result with result.save(path)")
        P = np.asarray(z["P"])
        if P.ndim != 2 or P.dtype.kind != "f" or 0 in P.shape or not np.all(np.isfinite(P)):
            checks.fail("path", f"{path} holding P of shape {P.shape}, dtype {P.dtype}",
                "a finite 2-D float P (N, K)", "recompute the influence; the file is damaged")
        n, K = P.shape
        try:
            meta = json.loads(str(z["meta"]))
            names = tuple(str(v) for v in z["names"]) if "names" in z else None
            fields = (meta["method"], meta["solver"], meta["curvature"], float(meta["damping"]),
                tuple(meta["escalations"]), meta["details"])
        except (KeyError, TypeError, ValueError) as e:
            checks.fail("path", f"{path} with unreadable metadata ({e})",
                "a file written by InfluenceResult.save",
                "recompute the influence; the file is damaged")
        for key, shape in (("names", (K,)), ("sample_ids", (n,)), ("steps", (K,)),
            ("residual", (K,)), ("converged", (K,)), ("negative_curvature", (K,)), ("status", (K,))
        ):
            value = names if key == "names" else z.get(key)
            if value is not None and np.shape(value) != shape:
                checks.fail("path", f"{path} whose {key} has shape {np.shape(value)}",
                    f"shape {shape} for P {P.shape}",
                    "recompute the influence; the file is damaged or edited")
        sol = z.get("solutions")
        if sol is not None and (sol.ndim != 2 or sol.shape[0] != K):
            checks.fail("path", f"{path} whose solutions have shape {sol.shape}",
                f"({K}, num_params)", "recompute the influence; the file is damaged or edited")
        method, solver, curvature, damping, escalations, details = fields
        return cls(jnp.asarray(P), method, solver, curvature, damping, escalations, z.get("steps"),
            z.get("residual"), z.get("converged"), z.get("negative_curvature"), z.get("status"),
            None if sol is None else jnp.asarray(sol), details, names, z.get("sample_ids"))


def influence_regions(P) -> np.ndarray:
    """+1 joint-positive (all P[i,k] > 0), −1 joint-negative (all < 0), 0 trade-off."""
    P = np.asarray(P)
    return np.where(
        (P > 0).all(1), JOINT_POSITIVE, np.where((P < 0).all(1), JOINT_NEGATIVE, TRADE_OFF)
    )
