"""DARE + TIES sign election: drop and rescale each task vector, then merge only the entries that agree in sign.

Yu et al., "Language Models are Super Mario" (DARE), ICML 2024, https://arxiv.org/abs/2311.03099, combined with
TIES-Merging's sign election (https://arxiv.org/abs/2306.01708). Code: https://github.com/yule-BUAA/MergeLM.
Rule: τ̃_t = (m_t ⊙ τ_t)/density; γ = sign(Σ_t w_t τ̃_t); θ = θ₀ + λ Σ_{t: sign(τ̃_t)=γ} w_t τ̃_t.
As in mergekit's ``dare_ties`` the random drop replaces TIES' magnitude trim and the agreeing deltas are summed
(``normalize=True`` averages them as TIES does).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._registry import MERGE
from ._sparsify import disjoint_merge, weights_or_ones
from .dare_linear import dropped


@MERGE.register("dare_ties", paper="https://arxiv.org/abs/2311.03099")
def dare_ties(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
              density: float | Sequence[float] = 0.1, scaling: float = 1.0, rescale: str | None = "inverse",
              normalize: bool = False, consensus: str = "sum",
              generator: torch.Generator | None = None) -> torch.Tensor:
    stacked = dropped(deltas, density, rescale, generator)
    w = weights_or_ones(weights, len(deltas), stacked[0])
    return base + scaling * disjoint_merge(stacked, w, consensus, normalize)


dare_ties.kind = "tensor"
