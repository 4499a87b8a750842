"""Shared pieces of the task-vector merges: magnitude trimming, random drop-and-rescale, outlier trimming and TIES'
sign election. Each works on one task vector δ (any shape) or on the stacked task vectors (T, ...)."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

RESCALES = ("inverse", "l1", None)


def weights_or_ones(weights: Sequence[float] | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """(T, 1, ..., 1) weights that broadcast against stacked deltas (T, ...)."""
    w = torch.ones(n) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    return w.to(like.device, like.dtype).reshape(n, *(1,) * like.dim())


def per_model(value: float | Sequence[float], n: int) -> list[float]:
    """One value per task vector: a per-model list as given, a single value repeated."""
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def magnitude_threshold(delta: torch.Tensor, density: float, official: bool = False) -> torch.Tensor:
    """The smallest |δ| kept when keeping the top ⌊density·n⌋ (at least one) entries by magnitude (mergekit).

    ``official``: TIES' own code (and FusionBench) take the (n − ⌊density·n⌋)-th smallest, which keeps one more.
    """
    flat = delta.reshape(-1).abs()
    k = int(density * flat.numel())
    return flat.kthvalue(max(1, flat.numel() - k) if official else flat.numel() - max(1, k) + 1).values


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


def votes(weighted: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """The sign vote per entry: the sign of the summed deltas ("sum", the paper's mass rule) or of the sign count."""
    return (weighted.sum(0) if method == "sum" else weighted.sign().sum(0)).sign()


def elect_signs(weighted: torch.Tensor, method: str = "sum", majority: float | None = None) -> torch.Tensor:
    """TIES' elected sign γ per entry. Entries whose vote is exactly 0 take the sign of the majority over all entries
    (official code); ``majority`` gives it when the entries are a block of a larger tensor."""
    gamma = votes(weighted, method)
    if majority is None:
        majority = 1.0 if gamma.sum() >= 0 else -1.0
    return torch.where(gamma == 0, torch.full_like(gamma, majority), gamma)


def kth_largest_abs(blocks: Callable[[], Iterable[Sequence[torch.Tensor]]], ks: Sequence[int]) -> list[float]:
    """For each stream t, the exact k_t-th largest |x| over blocks of float32 values (radix select on the bit patterns
    of non-negative floats, which order like integers): two passes, memory of one block, equal to ``kthvalue``."""
    hi = None
    for block in blocks():
        bits = [x.abs().reshape(-1).view(torch.int32) for x in block]
        counts = torch.stack([torch.bincount(b >> 16, minlength=1 << 16) for b in bits])
        hi = counts if hi is None else hi + counts
    top_bins, ranks = [], []
    for h, k in zip(hi, ks):  # the bin holding the k-th largest, and its rank inside that bin
        above = h.flip(0).cumsum(0)
        i = int(torch.searchsorted(above, torch.tensor(k)))
        top_bins.append((1 << 16) - 1 - i)
        ranks.append(k - int(above[i] - h[top_bins[-1]]))
    lo = None
    for block in blocks():
        counts = []
        for x, b in zip(block, top_bins):
            bits = x.abs().reshape(-1).view(torch.int32)
            counts.append(torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16))
        lo = torch.stack(counts) if lo is None else lo + torch.stack(counts)
    out = []
    for h, b, r in zip(lo, top_bins, ranks):
        v = (1 << 16) - 1 - int(torch.searchsorted(h.flip(0).cumsum(0), torch.tensor(r)))
        out.append(torch.tensor([(b << 16) | v], dtype=torch.int32).view(torch.float32).item())
    return out


def disjoint_merge(stacked: torch.Tensor, w: torch.Tensor, consensus: str | None, normalize: bool,
                   majority: float | None = None) -> torch.Tensor:
    """Σ_t w_t δ_t over the tasks whose sign agrees with the elected one, divided by Σ of their weights if normalize."""
    weighted = stacked * w
    if consensus is None:
        mixed, divisor = weighted.sum(0), w.sum(0).expand_as(weighted[0])
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    else:
        agree = (weighted.sign() == elect_signs(weighted, consensus, majority)).to(stacked.dtype)
        mixed, divisor = (weighted * agree).sum(0), (w * agree).sum(0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed / divisor if normalize else mixed
