"""FWSVD: Fisher-weighted SVD (Hsu, Hua, Chang, Lou, Shen & Jin, "Language model compression with weighted
low-rank factorization", ICLR 2022, https://arxiv.org/abs/2207.00112).

Each weight is weighted by its empirical Fisher importance for the task loss; sharing the importance along one
axis keeps a closed form. In the row-sharing orientation W (N×M), with Î = diag(√(Î_i + ε)), Î_i = Σ_j E[(∂L/∂W_ij)²]:

    min_{A,B} ‖Î (W − A B)‖_F   =>   Î W = U S Vᵀ,   A = Î⁻¹ U_r S_r^½,   B = S_r^½ V_rᵀ.

``row_axis="in"`` (default, as public BERT reimplementations do) shares the importance per *input* feature, i.e.
the rows of ``weight.T`` (in, out); ``"out"`` per output feature (rows of the nn.Linear weight (out, in)). The
Fisher row sums come from ``_calibrate.fisher`` (squared mini-batch gradients of the model's loss, or of the
``loss_fn`` given to ``compress_``; labels are used when the batches have them).

Official code: none released (third-party reimplementations of the closed form exist, e.g. a Skoltech NLA-2022
project). Deliberate choices, not deviations:
- the singular values are split evenly between the two factors (S^½ on each side, as ``LowRankLinear.from_linear``);
  the paper puts S on the A side. The product A B, hence the model, is the same.
- the paper's optional fine-tuning after factorization ("FWSVD + fine-tuning") is the user's ordinary training of
  the compressed model; nothing method-specific is needed for it.
- a targeted layer the loss does not reach has Î = 0, so it gets uniform weights, i.e. plain truncated SVD.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import COMPRESS
from ..linalg import truncated_svd
from ..nn import LowRankLinear
from ._calibrate import LayerStats
from .svd import check_svd

AXES = ("in", "out")


def fisher_svd(W: Tensor, row_weights: Tensor, rank: int, *, axis: str = "in",
               svd: str = "exact") -> tuple[Tensor, Tensor]:
    """The rank-``rank`` minimizer of the row-weighted error, for an nn.Linear-shaped ``W`` (out, in).

    Args:
        W: weight (out, in).
        row_weights: positive weights d (the diagonal of Î): length ``in`` for ``axis="in"`` (objective
            ‖(W − B A) diag(d)‖_F), length ``out`` for ``axis="out"`` (objective ‖diag(d) (W − B A)‖_F).
        rank: 1 <= rank <= min(out, in).
        svd: ``"exact"`` or ``"randomized"`` (see ``linalg.truncated_svd``).

    Returns:
        ``(up, down)``: B (out, rank) and A (rank, in), W ≈ B A, in W's dtype (half precision is factored in float32).
    """
    if axis not in AXES:
        raise SubspacesError(f"fisher_svd axis={axis!r}; allowed: {', '.join(AXES)}")
    check_svd("fisher_svd", svd)
    if W.dim() != 2:
        raise SubspacesError(f"fisher_svd W must be a matrix (out, in), got shape {tuple(W.shape)}")
    size = W.shape[1] if axis == "in" else W.shape[0]
    if row_weights.shape != (size,):
        raise SubspacesError(f"fisher_svd row_weights of shape {tuple(row_weights.shape)} for axis={axis!r} and a "
                             f"{tuple(W.shape)} weight: need ({size},)")
    if not 1 <= rank <= min(W.shape):
        raise SubspacesError(f"rank={rank} for a {tuple(W.shape)} weight: use 1..{min(W.shape)}")
    A = W.detach().float() if W.dtype in (torch.float16, torch.bfloat16) else W.detach()
    d = row_weights.detach().to(device=A.device, dtype=A.dtype)
    if not bool(torch.all(d > 0)) or not bool(torch.all(torch.isfinite(d))):
        raise SubspacesError("fisher_svd row_weights must be finite and > 0 (add eps to the Fisher row sums)")
    # "in": the rows of weight.T are the input features, so Î W_rowsᵀ = W diag(d); undo d on the same side.
    scaled = A * d if axis == "in" else d[:, None] * A
    U, S, Vh = truncated_svd(scaled, rank, method=svd)
    root = S.sqrt()
    up, down = U * root, root[:, None] * Vh
    if axis == "in":
        down = down / d
    else:
        up = up / d[:, None]
    return up.to(W.dtype), down.to(W.dtype)


@COMPRESS.register("fwsvd", paper="https://arxiv.org/abs/2207.00112", status="complete")
@dataclasses.dataclass(frozen=True, kw_only=True)
class FWSVD:
    """Fisher-weighted SVD of each weight (needs calibration batches with a loss: labels, or ``loss_fn``).

    ``row_axis``: share the Fisher importance per input feature (``"in"``, default) or per output feature
    (``"out"``). ``eps``: added to the Fisher row sums before the square root (keeps Î invertible).
    """

    svd: str = "exact"
    row_axis: str = "in"
    eps: float = 1e-5
    needs: ClassVar[frozenset[str]] = frozenset({"fisher"})

    def __post_init__(self) -> None:
        check_svd("FWSVD", self.svd)
        if self.row_axis not in AXES:
            raise SubspacesError(f"FWSVD row_axis={self.row_axis!r}; allowed: {', '.join(AXES)}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, (int, float)) or not (
                math.isfinite(self.eps) and self.eps > 0):
            raise SubspacesError(f"FWSVD eps={self.eps!r}; must be a finite number > 0")

    def row_weights(self, layer: nn.Linear, stats: LayerStats | None) -> Tensor:
        """√(Î_i + ε) along ``row_axis``, float64 on the layer's device."""
        if stats is None:
            raise SubspacesError("FWSVD needs Fisher statistics: pass calibration=[batch, ...] to compress_")
        raw = stats.fisher_in if self.row_axis == "in" else stats.fisher_out
        size = layer.in_features if self.row_axis == "in" else layer.out_features
        # No gradient reached this layer: Î = 0, uniform weights (plain SVD).
        fisher = stats.fisher(self.row_axis) if raw is not None else torch.zeros(size, dtype=torch.float64)
        return (fisher.to(device=layer.weight.device, dtype=torch.float64) + self.eps).sqrt()

    def compress(self, layer: nn.Linear, rank: int, stats: LayerStats | None) -> LowRankLinear:
        W = layer.weight
        up, down = fisher_svd(W, self.row_weights(layer, stats), rank, axis=self.row_axis, svd=self.svd)
        return LowRankLinear.from_factors(up, down, layer.bias, like=W)
