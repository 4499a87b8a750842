"""Layers shared by the train and compress families."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ._errors import SubspacesError
from .linalg import truncated_svd


class LowRankLinear(nn.Module):
    """A Linear of rank ``rank`` as two thin ones: ``y = up(down(x)) + b``, weight ``B A`` with
    ``A = down.weight`` (rank, in) and ``B = up.weight`` (out, rank); the bias, if any, lives in ``up``."""

    def __init__(self, in_features: int, out_features: int, rank: int, *, bias: bool = True,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank:
            raise SubspacesError(f"LowRankLinear rank={rank!r}: must be an integer >= 1")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.down(x))

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, *, svd: str = "exact") -> LowRankLinear:
        """The rank-``rank`` truncated SVD ``U S Vᵀ`` of ``linear.weight``, balanced: ``B = U S^½``, ``A = S^½ Vᵀ``."""
        W = linear.weight
        if not 1 <= rank <= min(W.shape):
            raise SubspacesError(f"rank={rank} for a {tuple(W.shape)} weight: use 1..{min(W.shape)}")
        U, S, Vh = truncated_svd(W.detach().float(), rank, method=svd)
        root = S.sqrt()
        return cls.from_factors(U * root, root[:, None] * Vh, linear.bias, like=W)

    @classmethod
    def from_factors(cls, up: Tensor, down: Tensor, bias: Tensor | None = None, *,
                     like: Tensor | None = None) -> LowRankLinear:
        """The layer ``up @ down`` (+ ``bias``) from factors up (out, r) and down (r, in) of any float dtype, stored in
        ``like``'s dtype and device (default: ``up``'s)."""
        like = up if like is None else like
        layer = cls(down.shape[1], up.shape[0], up.shape[1], bias=bias is not None, device=like.device,
                    dtype=like.dtype)
        with torch.no_grad():
            layer.up.weight.copy_(up)
            layer.down.weight.copy_(down)
            if bias is not None:
                layer.up.bias.copy_(bias)
        return layer

    @property
    def weight(self) -> Tensor:
        """The dense (out, in) weight ``B A`` (computed, not stored)."""
        return self.up.weight @ self.down.weight

    def to_linear(self) -> nn.Linear:
        """A dense ``nn.Linear`` with the same outputs."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.up.bias is not None,
                          device=self.down.weight.device, dtype=self.down.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            if self.up.bias is not None:
                layer.bias.copy_(self.up.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
