"""Linear merge (weighted average of the models; "model soups").

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time", ICML 2022, https://arxiv.org/abs/2203.05482. Rule: θ = Σ_t w_t θ_t / Σ_t w_t (``normalize=False``:
no division). Code: https://github.com/mlfoundations/model-soups. Same as mergekit's ``linear``.
The base, if given, is not one of the averaged models (list it in ``models`` to include it); it only supplies
non-float tensors and the config files.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._registry import MERGE
from ._sparsify import weights_or_ones


@MERGE.register("linear", paper="https://arxiv.org/abs/2203.05482")
def linear(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
           normalize: bool = True) -> torch.Tensor:
    stacked = torch.stack(list(deltas))
    w = weights_or_ones(weights, len(deltas), stacked[0])
    mixed = (stacked * w).sum(0)  # Σ w_t θ_t = (Σ w_t) θ₀ + Σ w_t δ_t, exact when every δ_t = 0
    return base + mixed / w.sum() if normalize else w.sum() * base + mixed


linear.kind = "tensor"
linear.needs_base = False
