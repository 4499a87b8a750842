"""SVD-LLM: truncation-aware data whitening (Wang, Zheng, Zhang & Zhang, "SVD-LLM: Truncation-aware Data Whitening
for Large Language Model Compression", https://arxiv.org/abs/2403.07378; official code
https://github.com/AIoT-MLSys-Lab/SVD-LLM, ``SVDLLM.py``).

Rule: with the lower Cholesky factor ``L L^T = X X^T`` of the calibration inputs, ``W L = U Σ Vᵀ`` and
``W' = U_r Σ_r (V_rᵀ L⁻¹)``. Because ``L⁻¹X`` has orthonormal rows (up to scale), the output error is exactly the
discarded spectrum: ``‖(W − W')X‖_F² = Σ_{i>r} σ_i(W L)²`` — truncating the smallest singular values is optimal.
The module is ``LowRankLinear`` with ``up = U_r Σ_r^½`` and ``down = Σ_r^½ V_rᵀ L⁻¹`` (bias on ``up``, unchanged), as
the official code splits ``Σ``.

Everything is computed in float64 (the official code: Cholesky in float64, SVD in float32); ``L⁻¹`` is applied by a
triangular solve, not an explicit inverse.

Damping: when the Cholesky factorization fails (or has a numerically zero pivot, tolerance ``n·ε·max diag``), the
official code adds ``(−λ_min + 10⁻⁶)·I``; we add ``(max(−λ_min, 0) + damping·mean diag(XXᵀ))·I`` and retry with
``damping`` ×10 until it factorizes. Relative to the mean diagonal (our moment is ``E[xxᵀ]``, not the token sum),
so the default does not depend on the number of calibration tokens.

Deviations: (1) the official whitening-only path profiles ``XXᵀ`` on the *uncompressed* model; our core collects each
block's statistics after the earlier blocks were compressed (as the paper's sequential update stage does). (2) The
paper's parameter update stage after truncation (v1 "SVD-LLM (W+U)": LoRA fine-tuning / least-squares update of
``U``) is left out. (3) Ranks come from our allocation (``ratio`` → uniform by default, like the official
``int(mn·ratio/(m+n))``).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import COMPRESS
from ..linalg import truncated_svd
from ..nn import LowRankLinear
from ._calibrate import LayerStats
from .svd import check_svd

_RETRIES = 12


def whitening(C: Tensor, damping: float) -> Tensor:
    """Lower Cholesky factor of the symmetric PSD ``C`` (n, n) in float64, damped when singular (see module doc)."""
    C = C.to(torch.float64)
    if not torch.isfinite(C).all():
        raise SubspacesError("SVDLLM: the input moment has inf/NaN entries; check the calibration data and model")
    C = (C + C.T) / 2
    n = C.shape[0]
    diag = C.diagonal()
    scale = float(diag.mean().clamp_min(0))
    if scale <= 0:  # no signal at all: every rank-r approximation is equally good; whiten by the identity
        return torch.eye(n, dtype=C.dtype, device=C.device)
    tol = n * torch.finfo(C.dtype).eps * float(diag.max())

    def factor(M: Tensor) -> Tensor | None:
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) != 0 or float(L.diagonal().square().min()) <= tol:
            return None
        return L

    L = factor(C)
    if L is not None:
        return L
    shift = max(-float(torch.linalg.eigvalsh(C)[0]), 0.0)
    eye = torch.eye(n, dtype=C.dtype, device=C.device)
    for _ in range(_RETRIES):
        L = factor(C + (shift + damping * scale) * eye)
        if L is not None:
            return L
        damping *= 10
    raise SubspacesError(f"SVDLLM: the input moment could not be factorized even with damping={damping:g}")


@COMPRESS.register("svd_llm", paper="https://arxiv.org/abs/2403.07378", status="complete",
                   note="truncation-aware whitening; the later parameter update stage (v1 'W+U', LoRA) is left out")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SVDLLM:
    """SVD of ``W L`` (``L``: Cholesky factor of the input moment), truncated, mapped back by ``L⁻¹``.

    ``damping``: relative diagonal loading (× mean diag of ``E[xxᵀ]``) used only when the Cholesky factorization
    fails; grows ×10 per retry. ``svd="randomized"`` uses a randomized range finder for the SVD of ``W L``.
    """

    damping: float = 1e-6
    svd: str = "exact"
    needs: ClassVar[frozenset[str]] = frozenset({"inputs"})

    def __post_init__(self) -> None:
        check_svd("SVDLLM", self.svd)
        if isinstance(self.damping, bool) or not isinstance(self.damping, (int, float)) or not self.damping > 0:
            raise SubspacesError(f"SVDLLM damping={self.damping!r}: must be a number > 0")

    def _whitened(self, layer: nn.Linear, stats: LayerStats | None) -> tuple[Tensor, Tensor]:
        if stats is None:
            raise SubspacesError("svd_llm needs calibration inputs: pass calibration=[batch, ...] to compress_")
        W = layer.weight.detach().to(torch.float64)
        L = whitening(stats.input_moment().to(W.device), float(self.damping))
        return W @ L, L

    def compress(self, layer: nn.Linear, rank: int, stats: LayerStats | None) -> LowRankLinear:
        WL, L = self._whitened(layer, stats)
        if not 1 <= rank <= min(WL.shape):
            raise SubspacesError(f"rank={rank} for a {tuple(WL.shape)} weight: use 1..{min(WL.shape)}")
        U, S, Vh = truncated_svd(WL, rank, method=self.svd)
        # Vhᵀ-rows times L⁻¹: solve Lᵀ Z = Vhᵀ  (Z = L⁻ᵀ Vhᵀ, so Zᵀ = Vh L⁻¹).
        A = torch.linalg.solve_triangular(L.T, Vh.T, upper=True).T
        return LowRankLinear.from_factors(U * S.sqrt(), S.sqrt()[:, None] * A, layer.bias, like=layer.weight)
