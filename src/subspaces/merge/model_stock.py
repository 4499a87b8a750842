"""Model Stock: interpolate between the average of the fine-tuned models and the base by their angle.

Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024, https://arxiv.org/abs/2403.19522.
Code: https://github.com/naver-ai/model-stock.
Rule: cos θ = mean over pairs of cos(τ_i, τ_j); t = N cos θ / (1 + (N − 1) cos θ); θ = t·mean(θ_i) + (1 − t)·θ₀.
Per tensor (``filter_wise=True``: per output row), as in mergekit; where 1 + (N − 1) cos θ ≈ 0 the base is kept.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._errors import SubspacesError
from .._registry import MERGE


@MERGE.register("model_stock", paper="https://arxiv.org/abs/2403.19522")
def model_stock(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, filter_wise: bool = False) -> torch.Tensor:
    n = len(deltas)
    if n < 2:
        raise SubspacesError("model_stock needs at least 2 fine-tuned models besides the base")
    rows = (lambda t: t.reshape(t.shape[0], -1)) if filter_wise and base.dim() > 1 else (lambda t: t.reshape(1, -1))
    flat = [rows(d) for d in deltas]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            norms = (flat[i].norm(dim=-1) * flat[j].norm(dim=-1)).clamp_min(1e-6)
            cos.append(((flat[i] * flat[j]).sum(-1) / norms).clamp(-1, 1))
    c = torch.stack(cos).mean(0)
    denom = 1 + (n - 1) * c
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(denom), denom))
    mean_delta = torch.stack([rows(d) for d in deltas]).mean(0)
    return base + (t[:, None] * mean_delta).reshape(base.shape)


model_stock.kind = "tensor"
