"""Shared pieces of the task-vector merges: magnitude trimming, random drop-and-rescale, outlier trimming and TIES'
sign election. Each works on one task vector δ (any shape) or on the stacked task vectors (T, ...)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

RESCALES = ("inverse", "l1", None)


def weights_or_ones(weights: Sequence[float] | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """(T, 1, ..., 1) weights that broadcast against stacked deltas (T, ...)."""
    w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return w.to(like.device, like.dtype).reshape(n, *(1,) * like.dim())


def magnitude_threshold(delta: torch.Tensor, density: float) -> torch.Tensor:
    """The smallest |δ| kept when keeping the top ⌊density·n⌋ (at least one) entries by magnitude."""
    flat = delta.reshape(-1).abs()
    k = max(1, int(density * flat.numel()))
    return flat.kthvalue(flat.numel() - k + 1).values


def trim(delta: torch.Tensor, density: float, threshold: torch.Tensor | float | None = None) -> torch.Tensor:
    """Keep the entries with |δ| ≥ the top-k threshold (ties at the threshold are all kept, as in TIES' code)."""
    if density >= 1 or delta.numel() == 0:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if threshold is None:
        threshold = magnitude_threshold(delta, density)
    return delta * (delta.abs() >= threshold)


def trim_outliers(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction by magnitude, then the smallest, keeping ``density``."""
    if density >= 1:
        return delta
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = delta.reshape(-1).abs().argsort()
    mask = torch.zeros(n, dtype=delta.dtype, device=delta.device)
    mask[order[bottom:bottom + keep]] = 1
    return delta * mask.reshape(delta.shape)


def drop(delta: torch.Tensor, density: float, rescale: str | None, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the survivors.

    ``rescale="inverse"``: by 1/density (the paper; unbiased); ``"l1"``: to the ℓ1 norm of δ (mergekit's ``rescale``);
    ``None``: not at all.
    """
    if density >= 1:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    kept = delta * mask
    if rescale == "inverse":
        return kept / density if density > 0 else kept
    if rescale == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        return kept * (before / after) if before >= 1e-7 and after >= 1e-7 else kept
    return kept


def elect_signs(stacked: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES' elected sign γ per entry: the sign of the summed deltas ("sum", the paper's mass rule) or of the sign
    count ("count"). Entries where that is exactly 0 take the sign of the majority over all entries (official code)."""
    votes = stacked.sum(0) if method == "sum" else stacked.sign().sum(0)
    gamma = votes.sign()
    majority = 1.0 if gamma.sum() >= 0 else -1.0
    return torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)


def disjoint_merge(stacked: torch.Tensor, w: torch.Tensor, consensus: str, normalize: bool) -> torch.Tensor:
    """Σ_t w_t δ_t over the tasks whose sign agrees with the elected one, divided by Σ of their weights if normalize."""
    weighted = stacked * w
    if consensus is None:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(weighted[0])
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    else:
        agree = (weighted.sign() == elect_signs(weighted, consensus)).to(stacked.dtype)
        mixed, divisor = (weighted * agree).sum(0), (w * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed / divisor if normalize else mixed
