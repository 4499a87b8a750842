"""FLoRA: Low-Rank Core Space for N-dimension (Si et al., 2024; ICLR 2025 as "Maintaining Structural Integrity
in Parameter Spaces for Parameter Efficient Fine-tuning"). https://arxiv.org/abs/2405.14739

Update rule: ΔW = s · G ×_1 U_1 ×_2 U_2 … ×_N U_N over the weight's own modes [d_in, d_out, k_1, …], with a
trainable core G ∈ R^{r_1×…×r_N} and factors U_n ∈ R^{d_n×r_n}; modes 0 and 1 are then swapped into PyTorch layout
(out, in, k_1, …). Linear (N=2): ΔW = s · U_out Gᵀ U_inᵀ = s · B E A. G = 0 at init, so ΔW = 0.
Official code: https://github.com/SJTU-DeepVisionLab/FLoRA (``flora/layers.py``, conv/N-mode) and
https://github.com/Chongjie-Si/Subspace-Tuning (``CR_MR/peft/src/peft/tuners/flora.py``, linear ``B E A``).
State-dict keys follow the official ``param_G`` / ``param_0..N-1``: ``G`` and ``U.0`` (in), ``U.1`` (out),
``U.2…`` (kernel modes).

Fast path (ΔW is never materialized): Linear is x U_in G U_outᵀ; a conv is three convs — a 1×1 conv U_inᵀ
(C_in → r_in), a k×k conv with the small core kernel G ×_3 U_h ×_4 U_w of shape (r_out, r_in, k_h, k_w) and the
layer's stride / padding / dilation, then a 1×1 conv U_out (r_out → C_out). This equals conv(x, ΔW) exactly:
zero padding commutes with the channel projection.

Deliberate deviations:
- One channel ``rank`` for the in and out modes and one ``kernel_rank`` for every kernel mode (the official ``r``
  list [16, 16, 2, 2] is ``rank=16, kernel_rank=2``); ``kernel_rank=None`` keeps kernel modes at full rank.
  A mode rank above the mode size is clipped to it (r_n = min(r, d_n)): the official code allocates the extra
  columns, which add parameters but no expressiveness. ``num_trainable`` counts the clipped ranks.
- Scaling s = alpha / rank as in Subspace-Tuning (the conv repo's ``scale=4`` with r=16 is ``alpha=64``).
- ``init="kaiming_normal"`` (conv repo: every U_n ~ kaiming_normal(a=√3), fan-in r_n) or ``"kaiming_uniform"``
  (Subspace-Tuning: U_in bound 1/√d_in, the other factors bound 1/√r_n); G = 0 in both.
- Conv layers need groups=1 and padding_mode='zeros' (the official code builds ΔW with C_in, so grouped convs fail
  there too). Embedding (the official N=1 variant adds one vector to every row) is not supported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ..linalg import tucker_product
from ._core import AdapterConfig, Delta, master_dtype, validate_common

_INITS = ("kaiming_normal", "kaiming_uniform")
_CONVS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _modes(layer: nn.Module) -> list[int]:
    """Mode sizes [d_in, d_out, k_1, …] of ``layer``'s weight, in the official order."""
    if isinstance(layer, nn.Linear):
        return [layer.in_features, layer.out_features]
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise SubspacesError("flora supports Conv layers with groups=1 and padding_mode='zeros'")
        return [layer.in_channels, layer.out_channels, *layer.kernel_size]
    raise SubspacesError(f"flora cannot adapt a {type(layer).__name__}; supported: Linear, Conv1d, Conv2d, Conv3d")


@ADAPTERS.register("flora", paper="https://arxiv.org/abs/2405.14739")
@dataclass(frozen=True, kw_only=True)
class FLoRA(AdapterConfig):
    """FLoRA hyperparameters: channel ``rank``, ``kernel_rank`` (None: full), s = alpha / rank."""

    rank: int = 8
    kernel_rank: int | None = None
    alpha: float = 8.0
    dropout: float = 0.0
    init: str = "kaiming_normal"

    def __post_init__(self) -> None:
        validate_common(self)
        k = self.kernel_rank
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
            raise SubspacesError(f"flora kernel_rank={k!r}: must be a positive integer or None (full rank)")
        if self.init not in _INITS:
            raise SubspacesError(f"flora init={self.init!r}: allowed {', '.join(_INITS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def ranks(self, layer: nn.Module) -> list[int]:
        """Per-mode Tucker ranks [r_in, r_out, r_k1, …] for ``layer`` (each clipped to its mode size)."""
        dims = _modes(layer)
        want = [self.rank, self.rank] + [self.kernel_rank or d for d in dims[2:]]
        return [min(r, d) for r, d in zip(want, dims)]

    def num_trainable(self, layer: nn.Module) -> int:
        dims, ranks = _modes(layer), self.ranks(layer)
        return math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks))

    def build(self, layer: nn.Module, *, init: bool = True) -> FLoRADelta:
        delta = FLoRADelta(layer, self)
        if init:
            delta.reset()
        return delta


class FLoRADelta(Delta):
    def __init__(self, layer: nn.Module, config: FLoRA) -> None:
        super().__init__()
        w = layer.weight
        dtype = master_dtype(w)
        kw = dict(device=w.device, dtype=dtype)
        dims, ranks = _modes(layer), config.ranks(layer)
        self.G = nn.Parameter(torch.zeros(ranks, **kw))
        self.U = nn.ParameterList([nn.Parameter(torch.zeros(d, r, **kw)) for d, r in zip(dims, ranks)])
        self.scaling, self.init = config.scaling, config.init
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.is_conv = len(dims) > 2
        if self.is_conv:
            self.conv = _CONVS[len(dims) - 2]
            self.conv_args = (layer.stride, layer.padding, layer.dilation)

    @torch.no_grad()
    def reset(self) -> None:
        nn.init.zeros_(self.G)
        for n, U in enumerate(self.U):
            if self.init == "kaiming_normal":
                nn.init.kaiming_normal_(U, a=math.sqrt(3))  # fan-in = r_n (U is (d_n, r_n))
            else:  # Subspace-Tuning: A = U_inᵀ (r, d_in) has fan-in d_in; B = U_out (d_out, r) has fan-in r
                nn.init.kaiming_uniform_(U.T if n == 0 else U, a=math.sqrt(5))

    def weight(self) -> torch.Tensor:
        dw = tucker_product(self.G, list(self.U)) * self.scaling  # (d_in, d_out, k_1, …)
        return dw.transpose(0, 1)

    def _branch(self, x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        """s · ΔW x in dtype ``dt`` without materializing ΔW."""
        G, U = self.G.to(dt), [u.to(dt) for u in self.U]
        if x.dtype != dt:
            x = x.to(dt)
        if self.drop is not None:
            x = self.drop(x)
        if not self.is_conv:
            return F.linear(x @ (U[0] @ G), U[1]) * self.scaling  # x U_in G U_outᵀ
        ones = (1,) * (G.ndim - 2)
        core = tucker_product(G, [None, None, *U[2:]]).transpose(0, 1) * self.scaling  # (r_out, r_in, k_1, …)
        h = self.conv(x, U[0].T.reshape(*U[0].T.shape, *ones))  # 1×1: C_in -> r_in
        h = self.conv(h, core, None, *self.conv_args)  # k×k with the layer's stride / padding / dilation
        return self.conv(h, U[1].reshape(*U[1].shape, *ones))  # 1×1: r_out -> C_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._branch(x, self.G.dtype)

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # The branch runs in the activations' dtype (fp32 master parameters are cast, not the layer input).
        return output + self._branch(x, output.dtype)
