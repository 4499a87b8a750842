"""ASVD: activation-aware SVD (Yuan, Shang, Song, Wu, Yan & Sun, "ASVD: Activation-aware Singular Value Decomposition
for Compressing Large Language Models", https://arxiv.org/abs/2312.05821; official code
https://github.com/hahnyuan/ASVD4LLM, ``modules/svd_linear.py`` and ``act_aware_utils.py``).

Rule: with a per-input-channel activation scale ``S = diag(s^α)``, ``W S = U Σ Vᵀ`` and ``W' = U_r Σ_r (V_rᵀ S⁻¹)``:
input channels that carry large activations are approximated more carefully. The module is ``LowRankLinear`` with
``up = U_r Σ_r^½``, ``down = Σ_r^½ V_rᵀ S⁻¹`` (the official default ``sigma_fuse="UV"``), bias on ``up``, unchanged.
Defaults follow the official code: ``alpha=0.5`` and the ``"abs_mean"`` scaling method.

Deviations:
- The zero-division guard: the official code adds ``10⁻⁶`` to ``s^α``; we clamp ``s^α`` at ``10⁻⁶·max s^α`` (the
  same role, independent of the activation scale).
- The SVD is exact by default (the official code uses ``torch.svd_lowrank``); ``svd="randomized"`` is available.
- ASVD's sensitivity-based rank search (per-layer perplexity sensitivity + binary search) and its Fisher / abs-max
  scaling variants are left out: our allocation (``ratio``, ``rank``, ``energy``, ``allocation=``) picks the ranks.
- Statistics are collected block by block after the earlier blocks were compressed (our core's sequential runner);
  the official code profiles the uncompressed model once.
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

_FLOOR = 1e-6


@COMPRESS.register("asvd", paper="https://arxiv.org/abs/2312.05821", status="partial",
                   note="the sensitivity-based rank search and the Fisher / abs-max scaling variants are left out "
                        "(our allocation picks the ranks)")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ASVD:
    """SVD of ``W diag(s^alpha)`` (``s``: per-input-channel mean |x|), truncated, mapped back by the inverse scale.

    ``alpha``: strength of the activation scaling (0: plain SVD; the official default 0.5).
    """

    alpha: float = 0.5
    svd: str = "exact"
    needs: ClassVar[frozenset[str]] = frozenset({"inputs"})

    def __post_init__(self) -> None:
        check_svd("ASVD", self.svd)
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a < 0:
            raise SubspacesError(f"ASVD alpha={a!r}: must be a finite number >= 0 (the official default is 0.5)")

    def scale(self, stats: LayerStats | None) -> Tensor:
        """The per-input-channel scale ``s^alpha`` (in,), float64, floored away from zero."""
        if stats is None:
            raise SubspacesError("asvd needs calibration inputs: pass calibration=[batch, ...] to compress_")
        s = stats.input_abs_mean() ** self.alpha
        top = float(s.max())
        if not math.isfinite(top):
            raise SubspacesError("ASVD: the activation scale has inf/NaN entries; check the calibration data")
        if top <= 0:  # silent inputs: nothing to weigh by
            return torch.ones_like(s)
        return s.clamp_min(_FLOOR * top)

    def _scaled(self, layer: nn.Linear, stats: LayerStats | None) -> tuple[Tensor, Tensor]:
        W = layer.weight.detach().to(torch.float64)
        s = self.scale(stats).to(W.device)
        return W * s, s

    def compress(self, layer: nn.Linear, rank: int, stats: LayerStats | None) -> LowRankLinear:
        WS, s = self._scaled(layer, stats)
        if not 1 <= rank <= min(WS.shape):
            raise SubspacesError(f"rank={rank} for a {tuple(WS.shape)} weight: use 1..{min(WS.shape)}")
        U, S, Vh = truncated_svd(WS, rank, method=self.svd)
        root = S.sqrt()
        return LowRankLinear.from_factors(U * root, root[:, None] * (Vh / s), layer.bias, like=layer.weight)
