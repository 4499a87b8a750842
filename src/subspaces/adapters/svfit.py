"""SVFit: Parameter-Efficient Fine-Tuning of Large Pre-Trained Models Using Singular Values (Sun et al., 2024).
https://arxiv.org/abs/2409.05926

Update rule: W0 = U Σ Vᵀ, W' = U_r diag(σ') V_rᵀ + W_e with W_e = W0 - U_r diag(σ) V_rᵀ frozen, i.e.
ΔW = U_r diag(σ' - σ) V_rᵀ; only σ' ∈ R^r trains (init σ' = σ, so ΔW = 0). Official code: none published.

r is either ``rank`` or, when ``rank`` is None, the smallest r with Σ_{i≤r} σ_i² / Σ_i σ_i² ≥ ``energy`` (the
paper's "over 99% of the matrix's information"; we read information as squared singular values, i.e. Frobenius
energy; ``energy=1`` keeps all k = min(d_out, d_in)). U_r, V_rᵀ and σ are persistent fp32 buffers (fp64 on
fp64 bases) from ``linalg.truncated_svd``.

Deliberate deviations / choices:
- W_e is never stored or moved: the base keeps W0 and the branch adds U_r diag(σ' - σ) V_rᵀ x, which equals the
  paper's (W_e + U_r diag(σ') V_rᵀ) x exactly in real arithmetic (same gradient for σ'), is bit-exact at init,
  and leaves ``adapters_disabled`` working.
- σ' is unconstrained (sign flips allowed), as the paper states no constraint.
- Layers: nn.Linear and transformers' GPT-2 Conv1D (weight (d_in, d_out)).
- With ``energy``, r depends on W: ``build(init=False)`` (loading) recomputes the singular values of W (not the
  vectors) to size the buffers, so a saved adapter must be loaded onto the same base weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import AdapterConfig, Delta, master_dtype


def _matrix(layer: nn.Module) -> tuple[torch.Tensor, bool]:
    """(W as (d_out, d_in), transposed?) for the layers SVFit supports."""
    if isinstance(layer, nn.Linear):
        return layer.weight, False
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight.T, True  # GPT-2 Conv1D stores (d_in, d_out)
    raise SubspacesError(f"svfit cannot adapt a {type(layer).__name__}; supported: Linear, transformers Conv1D")


def energy_rank(S: torch.Tensor, energy: float) -> int:
    """The smallest r with Σ_{i≤r} S_i² / Σ_i S_i² ≥ ``energy`` (S descending); ``energy=1`` keeps all of S."""
    if energy >= 1.0:
        return S.numel()
    e = S.double().square()
    cum = e.cumsum(0) / e.sum()
    r = int((cum < energy).sum().item()) + 1
    return min(r, S.numel())


@ADAPTERS.register("svfit", paper="https://arxiv.org/abs/2409.05926")
@dataclass(frozen=True, kw_only=True)
class SVFit(AdapterConfig):
    """SVFit hyperparameters: a fixed ``rank`` r, or (``rank=None``) the ``energy`` fraction to keep."""

    rank: int | None = None
    energy: float = 0.99

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank <= 0):
            raise SubspacesError(f"svfit rank={self.rank!r}: must be a positive integer or None (use energy)")
        if not isinstance(self.energy, (int, float)) or not 0.0 < self.energy <= 1.0 or math.isnan(self.energy):
            raise SubspacesError(f"svfit energy={self.energy!r}: must be in (0, 1]")

    def rank_for(self, layer: nn.Module) -> int:
        """r for this layer: ``rank``, or the energy rule on W's singular values."""
        w, _ = _matrix(layer)
        k = min(w.shape)
        if self.rank is not None:
            if self.rank > k:
                raise SubspacesError(f"svfit rank={self.rank} must be <= min(d_out, d_in) = {k} for this "
                                     f"{type(layer).__name__} {tuple(w.shape)}")
            return self.rank
        with torch.no_grad():
            return energy_rank(torch.linalg.svdvals(w.detach().to(master_dtype(w))), self.energy)

    def num_trainable(self, layer: nn.Module) -> int:
        return self.rank_for(layer)

    def build(self, layer: nn.Module, *, init: bool = True) -> SVFitDelta:
        w, transposed = _matrix(layer)
        delta = SVFitDelta(w, self.rank_for(layer), transposed)
        if init:
            delta.reset(w)
        return delta


class SVFitDelta(Delta):
    """U (d_out, r), Vh (r, d_in), sigma0 (r) frozen buffers; sigma (r) trainable."""

    def __init__(self, w: torch.Tensor, r: int, transposed: bool) -> None:
        super().__init__()
        kw = dict(device=w.device, dtype=master_dtype(w))
        d_out, d_in = w.shape
        self.transposed = transposed
        self.register_buffer("U", torch.zeros(d_out, r, **kw))
        self.register_buffer("Vh", torch.zeros(r, d_in, **kw))
        self.register_buffer("sigma0", torch.zeros(r, **kw))
        self.sigma = nn.Parameter(torch.zeros(r, **kw))

    @torch.no_grad()
    def reset(self, w: torch.Tensor) -> None:
        from ..linalg import truncated_svd

        U, S, Vh = truncated_svd(w.detach().to(self.U.dtype), self.sigma.numel())
        self.U.copy_(U)
        self.Vh.copy_(Vh)
        self.sigma0.copy_(S)
        self.sigma.copy_(S)

    def weight(self) -> torch.Tensor:
        dw = (self.U * (self.sigma - self.sigma0)) @ self.Vh  # (d_out, d_in)
        return dw.T if self.transposed else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x.to(self.U.dtype), self.Vh) * (self.sigma - self.sigma0)
        return F.linear(h, self.U)
