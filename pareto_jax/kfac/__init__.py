"""K-FAC and EK-FAC curvature for flax nnx Linear, LinearGeneral, Conv and Embed layers: factors
and their solve (`layers` says how each is seen as a matrix applied at positions).

For the Gauss-Newton matrix of softmax cross-entropy, G = E_i[J_iᵀ H_i J_i] with the output
Hessian H_i = diag p_i − p_i p_iᵀ = Σ_c p_ic (p_i − e_c)(p_i − e_c)ᵀ, so H_i = R_i R_iᵀ with
columns r_ic = √p_ic (p_i − e_c): pseudo-gradient c of sample i is the backward pass of r_ic and
carries the weight √p_ic (not √p_j on entry j). For one layer with inputs ã (a 1 appended for
the bias; conv patches per position t) and output pseudo-gradients δ_c:

* **K-FAC** (Martens & Grosse 2015; KFC for convolutions, Grosse & Martens 2016): the layer's
  block of G is approximated by A ⊗ S with A = E[Σ_t ã_t ã_tᵀ / T] and
  S = E[Σ_c Σ_t δ_ct δ_ctᵀ]. The expectation over classes is exact (every c, weighted as
  above) by default; ``fisher="sampled"`` draws one label ŷ per sample from the model instead
  and backpropagates r = p − e_ŷ (E_ŷ[r rᵀ] = H: unbiased, noisier, one backward pass per batch
  instead of K; Kronfluence's default).
* **EK-FAC** (George et al. 2018): K-FAC's eigenbasis Q_A ⊗ Q_S, with the eigenvalues replaced
  by the exact second moments of the per-sample pseudo-gradients in that basis,
  E[Σ_c (Q_Aᵀ (Σ_t ã_t δ_ctᵀ) Q_S)²]. For a dense layer applied once per sample the per-sample
  gradient is rank one, so this is E[Σ_c (Q_Aᵀã)² (Q_Sᵀδ_c)²ᵀ] and no per-sample gradient
  matrix is ever formed.
* **Embeddings**: ã_t is the one-hot of the token at position t, so A is diagonal (the tokens'
  mean frequency per position) with the identity as eigenbasis, never formed as a V × V matrix;
  EK-FAC's moment for token v is E[Σ_c ((Σ_{t: token v} Q_Sᵀδ_ct)²)]: each sample's positions
  grouped by token and summed before squaring.
* **Sequences** (Linear / LinearGeneral on (B, T, ...)): the positions are the tokens, as for a
  convolution's output positions; EK-FAC then uses the per-sample gradient summed over them.

`compute_factors` streams the data in fixed-size batches (one forward pass per batch, then one
class's backward pass at a time from its residuals: never a (K, batch, ...) array, and nothing
compiled grows with K) with programs compiled once per model and reused by later calls. `Factors`
record where each layer sits in the flat parameter vector (and the objective's λ), so
`solve_kfac` works on flat vectors: it is the linear solve (F̂ + (λ + δ)I)⁻¹B with the
`linsolve` signature, δ the damping as for every solver (`factors`, `solve`).
See ``docs/method.md`` §3.
"""

from .factors import (
    Factors,
    LayerFactors,
    compute_factors,
    default_selection,
    load_factors,
    output_root,
    param_keys,
    sampled_root,
    save_factors,
)
from .layers import FACTORED_TYPES, TYPE_NAMES, Layer, kernel_from_matrix, kernel_matrix, patches
from .solve import apply_inverse, preconditioner, solve_kfac

__all__ = ["FACTORED_TYPES", "TYPE_NAMES", "Factors", "Layer", "LayerFactors", "compute_factors",
    "default_selection", "kernel_from_matrix", "kernel_matrix", "load_factors", "output_root",
    "param_keys", "patches", "sampled_root", "save_factors",
    "apply_inverse", "preconditioner", "solve_kfac"]
