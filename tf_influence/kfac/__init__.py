"""K-FAC and EK-FAC inverse-Hessian approximations for Keras 3 models (TensorFlow).

The Hessian of ``L = 1/N Σ_n l_n + R`` is replaced by a block-diagonal curvature: one block per
layer that owns variables of the parameter group, plus the exact Hessian of the L2 regularisers
and of any extra diagonal (the ``2α I`` of case 2, eq. 15).

Per layer (Martens & Grosse 2015; George et al. 2018 for the eigenvalue correction):

* a Kronecker block for ``Dense``, ``EinsumDense`` (the query / key / value / output projections of
  ``MultiHeadAttention``), ``Conv1D`` / ``Conv2D`` (inputs expanded into patches, each output
  position a "token"; ``valid`` / ``same`` / ``causal`` padding, strides, dilation) and ``Embedding``. With ``a`` the layer's input (plus a constant 1 for the
  bias) and ``g = ∂l_n/∂s`` the gradient of an example's loss with respect to the layer's
  *pre-activation* output ``s``, the example's kernel gradient is ``G_n = Σ_t a_t g_tᵀ`` (``t`` runs
  over sequence positions) and::

      A = 1/(N T) Σ_{n,t} a_t a_tᵀ,     S = 1/N Σ_{n,t} g_t g_tᵀ,     F_layer ≈ A ⊗ S

  For ``Embedding`` ``a`` is the one-hot token, so ``A`` is diagonal (token frequencies) and is
  never materialised as a dense ``[vocab, vocab]`` matrix's eigendecomposition.
* vocabulary-sized sides (more than ``dense_factor_max`` = :data:`DENSE_FACTOR_MAX` entries: the
  logits side of a tied ``ReversibleEmbedding``, of an untied ``reverse_embeddings`` or of a
  ``Dense(vocab)`` head) are kept **diagonal** too — ``diag(Σ a²)`` / ``diag(Σ g²)`` with the identity
  as eigenbasis — and EK-FAC's correction then fits the exact Fisher diagonal in the basis
  ``I ⊗ Q_S`` (or ``Q_A ⊗ I``); smaller sides are dense exactly as before, so small vocabularies give
  the same numbers. Why diagonal and what it costs: ``docs/guides/ekfac.md``.
* ``kind="kfac"``: eigenvalues of the block are ``λ_A ⊗ λ_S``;
  ``kind="ekfac"``: the eigenbasis of ``A ⊗ S`` is kept and the eigenvalues are refit in a second
  pass, ``Λ_ij = 1/N Σ_n ((Q_Aᵀ G_n Q_S)_ij)²`` — the exact diagonal of the Fisher in that basis.
* variables of other layers (``LayerNormalization``, grouped convolutions, biases that do not cover a
  kernel's outputs) get a diagonal block ``1/N Σ_n g_n²`` (the Fisher's diagonal). They are listed
  in :meth:`KFACFactors.summary` — nothing is silently approximated.

``fisher="true"`` samples the labels from the model's predictive distribution (the Fisher then
equals the Gauss-Newton matrix of a softmax cross-entropy, the Hessian's positive part);
``fisher="empirical"`` uses the observed labels. The true Fisher needs a loss whose predictive
distribution is known: sparse categorical cross-entropy (logits or probabilities).

Inverse: ``(F + D + λ)⁻¹ v`` with ``D`` the regulariser / extra diagonal projected on the
eigenbasis (``(Q_A²)ᵀ D (Q_S²)``; exact when ``D`` is constant over a block, e.g. an L2 penalty on
a kernel without bias) and ``λ = damping + relative_damping × mean(Λ)`` per block
(kronfluence's heuristic is ``relative_damping = 0.1``).

Modules: :mod:`~tf_influence.kfac.blocks` (which layers are factored and how),
:mod:`tf_influence.capture` (recording layer inputs / output gradients, shared with ghost norms,
the projection and PRESENCE),
:mod:`~tf_influence.kfac.statistics` (the two fitting passes, whose dense products are
:mod:`~tf_influence.kfac.products`), :mod:`~tf_influence.kfac.factors`
(fitted factors and their files), :mod:`~tf_influence.kfac.inverse` (the damped inverse). Ghost norms,
which use the same capture, live in :mod:`tf_influence.ghost_norms`.
"""

from ..deprecation import moved_names
from .blocks import kronecker_blocks, norm_blocks
from .factors import FISHERS, KINDS, KFACFactors
from .inverse import KFACInverse, regularizer_coefficients, regularizer_diagonal
from .statistics import (CORRECTION_SEED_OFFSET, DENSE_FACTOR_MAX, FACTOR_BATCH_BYTES, FactorStatistics,
                         add_statistics, dense_factor_limit, eigenbases, fit_factors)

__all__ = ["FactorStatistics", "KFACFactors", "KFACInverse", "add_statistics", "eigenbases",
           "fit_factors", "kronecker_blocks", "norm_blocks", "regularizer_diagonal", "regularizer_coefficients", "KINDS", "FISHERS",
           "CORRECTION_SEED_OFFSET", "DENSE_FACTOR_MAX", "FACTOR_BATCH_BYTES", "dense_factor_limit"]


# GhostNorms lived here before 0.3; it moved beside the other per-example gradient code
__getattr__ = moved_names(__name__, {"GhostNorms": ("tf_influence.ghost_norms", "GhostNorms")})
