"""Category-wise influence functions (``docs/method.md``).

The influence of training sample z_i on class k is

    P[i, k] = (1/N) · ∇L(S^k; θ)ᵀ (H + δI)⁻¹ ∇ℓ(z_i; θ),

where L(S^k) is the mean loss over the validation samples of class k and H is the Hessian (or
Gauss-Newton matrix) of the training objective L_T(θ) = (1/N) Σ_i ℓ(z_i; θ) + (λ/2)‖θ‖².
**P > 0 means beneficial**: up-weighting z_i by ε changes class k's validation loss by −ε·P[i, k]
(to first order), and removing z_i raises it by about P[i, k].

Only K inverse-curvature solves are needed (one per class). One room per job:

* `front`: `category_influence` and `Influence` (fit once, then P per validation set, grouping
  or measurement);
* `validation`: every input check, once, before any work;
* `curvature`: which curvature (Hessian, Gauss-Newton with the loss's own output Hessian);
* `solvers`: the solver objects (CG, Dense, LiSSA, K-FAC/EK-FAC) with one signature, on any
  backend;
* `result`: `InfluenceResult`, its regions and file format;
* `stages`: the stages on their own, the jittable core `influence_matrix`, the closed form for
  linear heads and the first-order prediction of a weighting.

The numerics are `pareto_jax.kernels`, the solves `pareto_jax.linsolve` and `pareto_jax.kfac`.
"""

from ..config import InfluenceConfig
from .curvature import cross_entropy_mismatch, output_hessian_min_eig
from .front import Influence, category_influence
from .result import (
    JOINT_NEGATIVE,
    JOINT_POSITIVE,
    REGION_NAMES,
    TRADE_OFF,
    InfluenceResult,
    influence_regions,
)
from .solvers import CG, KFAC, DampingWarning, Dense, LiSSA
from .stages import (
    choose_method,
    class_gradients,
    influence_from_solutions,
    influence_matrix,
    linear_category_influence,
    make_hvp,
    per_sample_gradients,
    predict_class_loss_change,
)
from .unroll import PrecisionWarning, Retraining, unrolled_influence

__all__ = ["InfluenceConfig", "PrecisionWarning", "Retraining", "unrolled_influence", "Influence",
    "category_influence",
    "InfluenceResult", "influence_regions", "JOINT_POSITIVE", "JOINT_NEGATIVE", "TRADE_OFF",
    "REGION_NAMES", "CG", "Dense", "LiSSA", "KFAC", "DampingWarning", "choose_method",
    "class_gradients", "influence_from_solutions", "influence_matrix", "linear_category_influence",
    "make_hvp", "per_sample_gradients", "predict_class_loss_change", "cross_entropy_mismatch",
    "output_hessian_min_eig"]
