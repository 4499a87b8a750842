"""Task arithmetic: add scaled task vectors to the base.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023, https://arxiv.org/abs/2212.04089.
Rule: θ = θ₀ + λ Σ_t w_t τ_t, τ_t = θ_t − θ₀ (``normalize``: divide by Σ w_t). Negation is a negative weight.
Code: https://github.com/mlfoundations/task_vectors. ``scaling`` is the paper's λ (mergekit's ``lambda``,
FusionBench's ``scaling_factor``); the paper picks it on validation data from {0, 0.05, ..., 1}.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._registry import MERGE
from ._sparsify import disjoint_merge, weights_or_ones


@MERGE.register("task_arithmetic", paper="https://arxiv.org/abs/2212.04089")
def task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
                    scaling: float = 1.0, normalize: bool = False) -> torch.Tensor:
    stacked = torch.stack(list(deltas))
    mixed = disjoint_merge(stacked, weights_or_ones(weights, len(deltas), stacked[0]), None, normalize)
    return base + scaling * mixed


task_arithmetic.kind = "tensor"
