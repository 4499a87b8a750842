"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708. Code: https://github.com/prateeky2806/ties-merging.
Rule: τ̂_t = top-k(τ_t); γ = sign(Σ_t w_t τ̂_t); θ = θ₀ + λ Σ_{t: sign(τ̂_t)=γ} w_t τ̂_t / Σ_{t: sign(τ̂_t)=γ} w_t.

``density`` is k (the paper's default 20%; one value or one per model). ``trim="tensor"`` keeps the top k of each
tensor (mergekit; streams); ``trim="model"`` keeps the top k of the whole flattened task vector, as the official code
and FusionBench do (a first pass gathers every |τ_t|: T·P floats in memory). ``normalize=False`` sums instead of
averaging (FusionBench's ``merge_func="sum"``). ``consensus="count"`` elects by sign count instead of mass.
Deviation: entries whose vote is exactly 0 take the majority sign of their tensor (of the model with trim="model").
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .._errors import SubspacesError
from .._registry import MERGE
from ._sparsify import disjoint_merge, magnitude_threshold, trim as trim_delta, weights_or_ones


@MERGE.register("ties", paper="https://arxiv.org/abs/2306.01708")
def ties(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
         density: float | Sequence[float] = 0.2, scaling: float = 1.0, normalize: bool = True,
         consensus: str = "sum", trim: str = "tensor", thresholds: Sequence[float] | None = None) -> torch.Tensor:
    _check(consensus, trim)
    dens = density if isinstance(density, (list, tuple)) else [density] * len(deltas)
    cut = thresholds if trim == "model" and thresholds is not None else [None] * len(deltas)
    stacked = torch.stack([trim_delta(d, k, c) for d, k, c in zip(deltas, dens, cut)])
    return base + scaling * disjoint_merge(stacked, weights_or_ones(weights, len(deltas), stacked[0]), consensus,
                                           normalize)


def _check(consensus: str, trim: str) -> None:
    if consensus not in ("sum", "count"):
        raise SubspacesError(f"ties: consensus={consensus!r}; allowed: 'sum', 'count'")
    if trim not in ("tensor", "model"):
        raise SubspacesError(f"ties: trim={trim!r}; allowed: 'tensor', 'model'")


def _prepare(inputs: Iterable[tuple[torch.Tensor, list[torch.Tensor]]], *, trim: str = "tensor",
             density: float | Sequence[float] = 0.2, **_) -> dict:
    """With trim="model": each task vector's magnitude threshold over all its float tensors."""
    if trim != "model":
        return {}
    magnitudes: list[list[torch.Tensor]] = []
    for _, deltas in inputs:
        for t, d in enumerate(deltas):
            if len(magnitudes) <= t:
                magnitudes.append([])
            magnitudes[t].append(d.detach().abs().reshape(-1).float().cpu())
    dens = density if isinstance(density, (list, tuple)) else [density] * len(magnitudes)
    return {"thresholds": [float(magnitude_threshold(torch.cat(m), k)) for m, k in zip(magnitudes, dens)]}


ties.kind = "tensor"
ties.prepare = _prepare
