"""AFM — Atomic Feature Mimicking: keep the top principal subspace of a layer's *outputs*.

Paper: Yu, Fu, Ding, Zhou, Wu, "Unified Low-rank Compression Framework for Click-through Rate Prediction", KDD 2024,
https://arxiv.org/abs/2405.18146. Official code: https://github.com/yuhao318/Atomic_Feature_Mimicking.

Rule (y = W x + b, Cov[y] = U Λ Uᵀ with λ descending, U_k its first k columns):
    y ≈ U_k U_kᵀ (y − μ) + μ  =  U_k (U_kᵀ W x) + [U_k U_kᵀ b + (I − U_k U_kᵀ) μ]
The paper writes this as two Linears, W₁ = U_kᵀ W, b₁ = U_kᵀ b and W₂ = U_k, b₂ = (I − U_k U_kᵀ) μ. With no
activation between them the two biases fold into one on ``up``: ``down.weight = U_kᵀ W`` (k, in),
``up.weight = U_k`` (out, k), ``up.bias = U_k U_kᵀ b + (I − U_k U_kᵀ) μ``. On the calibration set the mean squared
output error is Σ_{i>k} λ_i, the least any rank-k affine map can reach.

Embedding tables: ``afm_embedding`` gives E' = (E − 1μᵀ) U_k (V, k), the lift U_k (d, k) and μ, so that
e_v ≈ U_k e'_v + μ.

Deviations:
- The "act" variants (ReLU between the two Linears, then fine-tuning with the CTR recipe) are left out: they need a
  training loop and change the function; without them the folded form above is exact.
- No automatic surgery for embedding tables (replacing ``nn.Embedding`` and fusing U_k into the next Linear): only
  the function ``afm_embedding``.
- Moments are accumulated over all calibration batches (the demo code overwrites its sums per batch), in float64,
  and the eigenvectors come from ``torch.linalg.eigh`` of the covariance (the demo takes an SVD of it: the same for
  a symmetric PSD matrix).
- The core collects statistics block by block (earlier blocks already compressed), not from one pass of the original
  model, and picks ranks from the weights' spectra (the paper's "ada" variants pick k from Λ).
- A layer without bias gains one (``out`` parameters): the mean correction (I − U_k U_kᵀ) μ needs it.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import COMPRESS
from ..nn import LowRankLinear
from ._calibrate import LayerStats


def _eig_desc(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors of a symmetric PSD matrix, in float64."""
    cov = cov.to(torch.float64)
    lam, U = torch.linalg.eigh((cov + cov.T) / 2)
    return lam.flip(0).clamp_min(0.0), U.flip(1)


def _check_rank(rank: int, d: int, what: str) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
        raise SubspacesError(f"AFM rank={rank!r} for {what}: must be an integer in 1..{d}")


def _output_moments(stats: LayerStats | None, d: int) -> tuple[Tensor, Tensor]:
    if stats is None:
        raise SubspacesError("AFM needs calibration outputs: pass calibration=[batch, ...] to compress_")
    mu, cov = stats.output_mean(), stats.output_cov()
    if mu.shape != (d,):
        raise SubspacesError(f"AFM got output statistics of size {tuple(mu.shape)} for a layer with {d} outputs")
    return mu, cov


@COMPRESS.register(
    "afm", paper="https://arxiv.org/abs/2405.18146", status="partial",
    note="no 'act' variant (ReLU between the factors + fine-tuning); embedding tables only through the function "
         "afm_embedding, no automatic nn.Embedding surgery or fusion into the next Linear")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AFM:
    """PCA of each Linear's calibration outputs: y ← U_k U_kᵀ (y − μ) + μ, folded into a ``LowRankLinear``.
    No hyperparameters besides the rank (from ``compress_``); it runs an eigendecomposition, not an SVD."""

    needs: ClassVar[frozenset[str]] = frozenset({"outputs"})

    def compress(self, layer: nn.Linear, rank: int, stats: LayerStats | None) -> LowRankLinear:
        d = layer.out_features
        _check_rank(rank, d, f"a layer with {d} outputs")
        mu, cov = _output_moments(stats, d)
        W = layer.weight.detach().to(torch.float64)
        mu = mu.to(W.device)
        U = _eig_desc(cov.to(W.device))[1][:, :rank]                        # (out, k)
        b = layer.bias.detach().to(torch.float64) if layer.bias is not None else torch.zeros_like(mu)
        bias = U @ (U.T @ (b - mu)) + mu                                     # U Uᵀ b + (I − U Uᵀ) μ
        return LowRankLinear.from_factors(U, U.T @ W, bias, like=layer.weight)


def afm_embedding(weight: Tensor, data: Tensor | LayerStats | None, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """AFM for an embedding table ``weight`` (V, d): ``(table (V, k), up weight (d, k), bias μ (d,))`` with
    ``e_v ≈ up @ table[v] + μ``, the projection of e_v onto the top-k principal affine subspace of the looked-up
    embeddings.

    ``data`` weighs the ids as the data does: counts (V,) of how often each id is looked up, or a ``LayerStats``
    with the outputs of the embedding collected on the data; ``None`` counts every row once. Results come in
    ``weight``'s dtype and device. To use them: ``nn.Embedding(V, k)`` with ``table``, then ``nn.Linear(k, d)``
    with ``up`` and ``μ`` (or fuse ``up`` into the next Linear when nothing sits in between).
    """
    if weight.ndim != 2:
        raise SubspacesError(f"afm_embedding weight: expected a (V, d) table, got shape {tuple(weight.shape)}")
    V, d = weight.shape
    _check_rank(rank, d, f"a ({V}, {d}) embedding table")
    E = weight.detach().to(torch.float64)
    if isinstance(data, LayerStats):
        mu, cov = (t.to(E.device) for t in _output_moments(data, d))
    else:
        c = torch.ones(V, dtype=E.dtype, device=E.device) if data is None else data.detach().to(E)
        if c.shape != (V,) or bool((c < 0).any()) or float(c.sum()) <= 0:
            raise SubspacesError(f"afm_embedding counts: expected {V} non-negative numbers with a positive sum, "
                                 f"got shape {tuple(c.shape)}")
        w = c / c.sum()
        mu = w @ E
        Ec = E - mu
        cov = (Ec * w[:, None]).T @ Ec                                       # Σ_v w_v (e_v − μ)(e_v − μ)ᵀ
    U = _eig_desc(cov)[1][:, :rank]                                          # (d, k)
    table = (E - mu) @ U
    return table.to(weight.dtype), U.to(weight.dtype), mu.to(weight.dtype)
