"""Plain truncated SVD: W ≈ U_r S_r V_rᵀ, the best rank-r approximation in Frobenius norm (Eckart & Young, "The
approximation of one matrix by another of lower rank", Psychometrika 1936, https://doi.org/10.1007/BF02288367).

The baseline of every compression paper: no data, W ← (U_r S_r^½)(S_r^½ V_rᵀ) as ``ss.nn.LowRankLinear``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

from torch import nn

from .._errors import SubspacesError
from .._registry import COMPRESS
from ..nn import LowRankLinear
from ._calibrate import LayerStats

SVD_METHODS = ("exact", "randomized")


def check_svd(owner: str, svd: str) -> None:
    if svd not in SVD_METHODS:
        raise SubspacesError(f"{owner} svd={svd!r}; allowed: {', '.join(SVD_METHODS)}")


@COMPRESS.register("svd", paper="https://doi.org/10.1007/BF02288367")
@dataclasses.dataclass(frozen=True, kw_only=True)
class SVD:
    """Truncated SVD of each weight. ``svd="randomized"`` uses a randomized range finder (faster, near-optimal)."""

    svd: str = "exact"
    needs: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        check_svd("SVD", self.svd)

    def compress(self, layer: nn.Linear, rank: int, stats: LayerStats | None) -> LowRankLinear:
        return LowRankLinear.from_linear(layer, rank, svd=self.svd)
