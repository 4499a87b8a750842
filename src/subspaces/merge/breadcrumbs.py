"""Model Breadcrumbs: drop both the largest outliers and the smallest entries of each task vector, then add.

Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks", ECCV 2024,
https://arxiv.org/abs/2312.06795. Code: https://github.com/rezazzr/breadcrumbs.
Rule: per tensor, sort |τ_t|, drop the top ``gamma`` fraction and the bottom until ``density`` remains;
θ = θ₀ + λ Σ_t w_t τ̂_t. As mergekit's ``breadcrumbs`` (per tensor, not per row).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._registry import MERGE
from ._sparsify import disjoint_merge, per_model, trim_outliers, weights_or_ones


@MERGE.register("breadcrumbs", paper="https://arxiv.org/abs/2312.06795")
def breadcrumbs(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
                density: float | Sequence[float] = 0.9, gamma: float = 0.01, scaling: float = 1.0,
                normalize: bool = False) -> torch.Tensor:
    stacked = torch.stack([trim_outliers(d, k, gamma) for d, k in zip(deltas, per_model(density, len(deltas)))])
    return base + scaling * disjoint_merge(stacked, weights_or_ones(weights, len(deltas), stacked[0]), None, normalize)


breadcrumbs.kind = "tensor"
