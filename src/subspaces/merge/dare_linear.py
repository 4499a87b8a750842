"""DARE (Drop And REscale) + task arithmetic.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch", ICML 2024,
https://arxiv.org/abs/2311.03099. Code: https://github.com/yule-BUAA/MergeLM.
Rule: τ̃_t = (m_t ⊙ τ_t)/density, m_t ~ Bernoulli(density) (density = 1 − p); θ = θ₀ + λ Σ_t w_t τ̃_t.

``rescale="inverse"`` is the paper's 1/density; ``"l1"`` restores each tensor's ℓ1 norm as mergekit's ``rescale: true``
does (the mergekit YAML reader picks it), ``None`` skips rescaling. Masks are seeded per tensor (``seed``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._errors import SubspacesError
from .._registry import MERGE
from ._sparsify import RESCALES, disjoint_merge, drop, per_model, weights_or_ones


def dropped(deltas: Sequence[torch.Tensor], density, rescale, generator) -> torch.Tensor:
    if rescale not in RESCALES:
        raise SubspacesError(f"rescale={rescale!r}; allowed: {', '.join(map(repr, RESCALES))}")
    return torch.stack([drop(d, k, rescale, generator) for d, k in zip(deltas, per_model(density, len(deltas)))])


@MERGE.register("dare_linear", paper="https://arxiv.org/abs/2311.03099")
def dare_linear(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
                density: float | Sequence[float] = 0.1, scaling: float = 1.0, rescale: str | None = "inverse",
                normalize: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    stacked = dropped(deltas, density, rescale, generator)
    return base + scaling * disjoint_merge(stacked, weights_or_ones(weights, len(deltas), stacked[0]), None, normalize)


dare_linear.kind = "tensor"
