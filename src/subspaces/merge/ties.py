"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708. Code: https://github.com/prateeky2806/ties-merging.
Rule: τ̂_t = top-k(τ_t); γ = sign(Σ_t w_t τ̂_t); θ = θ₀ + λ Σ_{t: sign(τ̂_t)=γ} w_t τ̂_t / Σ_{t: sign(τ̂_t)=γ} w_t.

``density`` is k (the paper's default 20%; one value or one per model). ``trim="tensor"`` keeps the top k of each
tensor (mergekit; streams); ``trim="model"`` keeps the top k of the whole flattened task vector, as the official code
and FusionBench do (a first pass gathers every |τ_t|: T·P floats in memory), with their count: ⌊k·P⌋ + 1 entries.
``normalize=False`` sums instead of averaging (FusionBench's ``merge_func="sum"``). ``consensus="count"`` elects by sign count instead of mass.
Deviation: entries whose vote is exactly 0 take the majority sign of their tensor (the official code: of the model).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from .._errors import SubspacesError
from .._registry import MERGE
from ._sparsify import (disjoint_merge, kth_largest_abs, magnitude_threshold, per_model, trim as trim_delta, votes,
                        weights_or_ones)


@MERGE.register("ties", paper="https://arxiv.org/abs/2306.01708")
def ties(base: torch.Tensor, deltas: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None,
         density: float | Sequence[float] = 0.2, scaling: float = 1.0, normalize: bool = True,
         consensus: str = "sum", trim: str = "tensor", _thresholds: Sequence[float] | None = None,
         _majority: float | None = None) -> torch.Tensor:
    # _thresholds / _majority: set by the core when the inputs are blocks of a tensor or trim="model"
    _check(consensus, trim)
    stacked = _trimmed(deltas, density, _thresholds)
    return base + scaling * disjoint_merge(stacked, weights_or_ones(weights, len(deltas), stacked[0]), consensus,
                                           normalize, _majority)


def _trimmed(deltas, density, thresholds) -> torch.Tensor:
    cut = thresholds if thresholds is not None else [None] * len(deltas)
    return torch.stack([trim_delta(d, k, c) for d, k, c in zip(deltas, per_model(density, len(deltas)), cut)])


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
    dens = per_model(density, len(magnitudes))
    return {"_thresholds": [float(magnitude_threshold(torch.cat(m), k, official=True))
                            for m, k in zip(magnitudes, dens)]}


def _tensor_stats(blocks: Callable[[], Iterable], *, density=0.2, weights=None, consensus="sum", _thresholds=None,
                  **_) -> dict:
    """What a block of rows needs from its whole tensor: each task's trim threshold (exact, streamed) and the
    tensor's majority sign."""
    n = blocks.n_models
    dens = per_model(density, n)
    if _thresholds is None and min(dens) < 1:
        ks = [max(1, int(k * blocks.numel)) for k in dens]
        _thresholds = kth_largest_abs(lambda: (d for _, d in blocks()), ks)
        _thresholds = [t if k < 1 else None for t, k in zip(_thresholds, dens)]
    total = 0.0
    for _, deltas in blocks():
        stacked = _trimmed(deltas, density, _thresholds)
        total += float(votes(stacked * weights_or_ones(weights, n, stacked[0]), consensus).sum())
    return {"_thresholds": _thresholds, "_majority": 1.0 if total >= 0 else -1.0}


ties.kind = "tensor"
ties.prepare = _prepare
ties.rowwise = True
ties.tensor_stats = _tensor_stats
