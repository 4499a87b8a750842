"""SALT: Singular Value Adaptation with Low-Rank Transformation (Elsayed et al., 2025).
https://arxiv.org/abs/2503.16055

Update rule: W0 = U diag(σ) Vᵀ (thin, k = min(d_out, d_in)), W' = U ReLU(Σ') Vᵀ with
Σ' = blockdiag(diag(a ⊙ σ_{1:r} + c), diag(σ_{r+1:k}) + X Y); trainable a, c ∈ R^r (init 1, 0),
X ∈ R^{t×r_lora}, Y ∈ R^{r_lora×t} (t = k - r; X kaiming-uniform, Y = 0, as the official SAM2 layer): ΔW = 0 at init.
Official code: https://github.com/BioMedIA-MBZUAI/SALT (``SALTLinear`` / ``SALTConv2d``).

r = ``rank`` if given (SAM-v1 code), else max(1, ⌊ratio·k⌋) (SAM2 code); r_lora = ``lora_rank`` (SAM2 default 256,
which is larger than the tail of small layers; like the official code we do not clip it).
``relu_mode="full"`` applies ReLU to every entry of the k×k Σ' as the official code does (negative off-diagonal
entries of X Y are zeroed too); ``"diag"`` applies it to the diagonal only. The official regularizer
L_reg = ‖diag(a⊙σ+c) - diag(σ)‖_F + ‖XY‖_F (``SALTDelta.reg_loss()``) is the method's ``penalty``:
``ss.adapters.penalty(model)`` (or the Trainer callback) adds ``reg_multiplier · Σ_layers L_reg`` to the loss
(official train.py default 0.01; its SALT_config.yml uses 0).

Deliberate deviations:
- The base keeps W0 and the branch adds ΔW = U (ReLU(Σ') - diag(σ)) Vᵀ instead of replacing W0 by U ReLU(Σ') Vᵀ.
  The two differ only by the SVD round-off W0 - U diag(σ) Vᵀ; this way the identity at init is bit-exact,
  ``unadapt_`` restores W0 exactly and ``adapters_disabled`` works. U, Vᵀ, σ are persistent fp32 buffers.
- Layers: nn.Linear, transformers' GPT-2 Conv1D and nn.Conv2d (kernel as (C_out, C_in/groups·kh·kw); any groups,
  padding_mode='zeros').
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

_RELU_MODES = ("full", "diag")


def _matrix(layer: nn.Module) -> tuple[torch.Tensor, str]:
    """(W as a (d_out, d_in) matrix, layer kind)."""
    if isinstance(layer, nn.Linear):
        return layer.weight, "linear"
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight.T, "conv1d_t"
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise SubspacesError("salt supports Conv2d with padding_mode='zeros'")
        return layer.weight.flatten(1), "conv2d"
    raise SubspacesError(f"salt cannot adapt a {type(layer).__name__}; supported: Linear, Conv2d, "
                         "transformers Conv1D")


@ADAPTERS.register("salt", paper="https://arxiv.org/abs/2503.16055")
@dataclass(frozen=True, kw_only=True)
class SALT(AdapterConfig):
    """SALT hyperparameters (official SAM2 defaults: ratio 0.1, lora_rank 256, ReLU on the whole Σ')."""

    ratio: float = 0.1
    rank: int | None = None
    lora_rank: int = 256
    relu_mode: str = "full"
    reg_multiplier: float = 0.01

    def __post_init__(self) -> None:
        if not isinstance(self.ratio, (int, float)) or not 0.0 < self.ratio <= 1.0:
            raise SubspacesError(f"salt ratio={self.ratio!r}: must be in (0, 1]")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int)
                                      or self.rank <= 0):
            raise SubspacesError(f"salt rank={self.rank!r}: must be a positive integer or None (use ratio)")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank <= 0:
            raise SubspacesError(f"salt lora_rank={self.lora_rank!r}: must be a positive integer")
        if self.relu_mode not in _RELU_MODES:
            raise SubspacesError(f"salt relu_mode={self.relu_mode!r}: allowed {', '.join(_RELU_MODES)}")
        if not isinstance(self.reg_multiplier, (int, float)) or not self.reg_multiplier >= 0:
            raise SubspacesError(f"salt reg_multiplier={self.reg_multiplier!r}: must be a number >= 0")

    @classmethod
    def penalty(cls, deltas: list[Delta]) -> torch.Tensor | None:
        """reg_multiplier · Σ L_reg over the given SALT layers (None when every multiplier is 0)."""
        terms = [d.config.reg_multiplier * d.reg_loss() for d in deltas if d.config.reg_multiplier]
        return torch.stack(terms).sum() if terms else None

    def split(self, layer: nn.Module) -> tuple[int, int]:
        """(r, t): the number of scaled/shifted top singular values and the tail size k - r."""
        w, _ = _matrix(layer)
        k = min(w.shape)
        r = self.rank if self.rank is not None else max(1, math.floor(self.ratio * k))
        if r > k:
            raise SubspacesError(f"salt rank={r} must be <= min(d_out, d_in) = {k} for this "
                                 f"{type(layer).__name__} {tuple(w.shape)}")
        return r, k - r

    def num_trainable(self, layer: nn.Module) -> int:
        r, t = self.split(layer)
        return 2 * r + 2 * t * self.lora_rank

    def build(self, layer: nn.Module, *, init: bool = True) -> SALTDelta:
        w, kind = _matrix(layer)
        r, t = self.split(layer)
        delta = SALTDelta(layer, w, kind, r, t, self)
        if init:
            delta.reset(w)
        return delta


class SALTDelta(Delta):
    """Buffers U (d_out, k), Vh (k, d_in), sigma (k); parameters scale, shift (r), X (t, r_lora), Y (r_lora, t)."""

    def __init__(self, layer: nn.Module, w: torch.Tensor, kind: str, r: int, t: int, config: SALT) -> None:
        super().__init__()
        dtype = master_dtype(w)
        kw = dict(device=w.device, dtype=dtype)
        (d_out, d_in), k = w.shape, r + t
        self.kind, self.r, self.relu_mode = kind, r, config.relu_mode
        self.shape = tuple(layer.weight.shape)
        if kind == "conv2d":
            self.conv_args = (layer.stride, layer.padding, layer.dilation, layer.groups)
        self.register_buffer("U", torch.zeros(d_out, k, **kw))
        self.register_buffer("Vh", torch.zeros(k, d_in, **kw))
        self.register_buffer("sigma", torch.zeros(k, **kw))
        self.scale = nn.Parameter(torch.ones(r, **kw))
        self.shift = nn.Parameter(torch.zeros(r, **kw))
        self.X = nn.Parameter(torch.zeros(t, config.lora_rank, **kw))
        self.Y = nn.Parameter(torch.zeros(config.lora_rank, t, **kw))

    @torch.no_grad()
    def reset(self, w: torch.Tensor) -> None:
        from ..linalg import truncated_svd

        U, S, Vh = truncated_svd(w.detach().to(self.U.dtype), self.sigma.numel())
        self.U.copy_(U)
        self.Vh.copy_(Vh)
        self.sigma.copy_(S)
        self.scale.fill_(1.0)
        self.shift.zero_()
        if self.X.numel():  # (nonlinearity="relu" makes torch ignore a; kept as the official call)
            nn.init.kaiming_uniform_(self.X, a=math.sqrt(20), mode="fan_in", nonlinearity="relu")
        self.Y.zero_()

    def core(self) -> torch.Tensor:
        """ReLU(Σ') - diag(σ), the k×k change of the singular-value matrix."""
        top = self.scale * self.sigma[:self.r] + self.shift
        sig = torch.block_diag(torch.diag(top), torch.diag(self.sigma[self.r:]) + self.X @ self.Y)
        if self.relu_mode == "full":
            sig = F.relu(sig)
        else:
            d = torch.diagonal(sig)
            sig = sig + torch.diag(F.relu(d) - d)
        return sig - torch.diag(self.sigma)

    def reg_loss(self) -> torch.Tensor:
        """L_reg = ‖diag(a⊙σ+c) - diag(σ)‖_F + ‖X Y‖_F (0 at init)."""
        top = self.sigma[:self.r]
        return torch.linalg.vector_norm(self.scale * top + self.shift - top) + torch.linalg.norm(self.X @ self.Y)

    def _dw(self) -> torch.Tensor:
        return self.U @ self.core() @ self.Vh  # (d_out, d_in)

    def weight(self) -> torch.Tensor:
        dw = self._dw()
        if self.kind == "conv1d_t":
            return dw.T
        return dw.view(self.shape) if self.kind == "conv2d" else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.U.dtype)
        if self.kind == "conv2d":
            return F.conv2d(x, self.weight(), None, *self.conv_args)
        return F.linear(F.linear(F.linear(x, self.Vh), self.core()), self.U)

