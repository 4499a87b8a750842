"""Asymmetric LSH clustering of queries and keys into equal-size buckets: the sparse support of Scatterbrain
(``compress/scatterbrain.py``), after SMYRF (Daras et al., "SMYRF: Efficient Attention using Asymmetric
Clustering", NeurIPS 2020, https://arxiv.org/abs/2010.05315; code https://github.com/giannisdaras/smyrf).

XBOX+: q̂ = [q, 0, √(M − ‖q‖²)], k̂ = [k, √(M − ‖k‖²), 0] with M = max‖q‖² + max‖k‖², so that
‖q̂ − k̂‖² = 2M − 2 q·k: Euclidean neighbours are the large inner products. Each hash round projects q̂ and k̂ on
one Gaussian direction (E2LSH before quantization) and sorts; the sorted order cut into consecutive chunks gives
buckets of equal size (n_b query buckets paired with n_b key buckets). Invalid rows sort last.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def xbox_plus(q: Tensor, k: Tensor, q_valid: Tensor, k_valid: Tensor) -> tuple[Tensor, Tensor]:
    """(q̂, k̂): (..., n, d) -> (..., n, d + 2); the maxima run over valid rows only (per batch and head)."""
    qn, kn = q.square().sum(-1, keepdim=True), k.square().sum(-1, keepdim=True)
    big = (qn.masked_fill(~q_valid.unsqueeze(-1), 0).amax(-2, keepdim=True)
           + kn.masked_fill(~k_valid.unsqueeze(-1), 0).amax(-2, keepdim=True))
    qe, ke = (big - qn).clamp_min(0).sqrt(), (big - kn).clamp_min(0).sqrt()
    return torch.cat([q, torch.zeros_like(qe), qe], -1), torch.cat([k, ke, torch.zeros_like(ke)], -1)


def hash_order(x: Tensor, directions: Tensor, valid: Tensor) -> Tensor:
    """Per round, the permutation sorting the rows of x (..., n, e) by their projection on ``directions``
    (e, R): (R, ..., n); invalid rows (``valid`` False) last."""
    proj = (x @ directions).movedim(-1, 0).masked_fill(~valid, math.inf)
    return proj.argsort(dim=-1, stable=True)


def inverse(perm: Tensor) -> Tensor:
    """The inverse permutation along the last axis."""
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    return torch.empty_like(perm).scatter_(-1, perm, ar)


def take(x: Tensor, perm: Tensor) -> Tensor:
    """Rows of x (..., n, c) in the order ``perm`` (..., n)."""
    return x.gather(-2, perm.unsqueeze(-1).expand(*perm.shape, x.shape[-1]))


def take1(x: Tensor, perm: Tensor) -> Tensor:
    """Entries of x (..., n) in the order ``perm`` (..., n)."""
    return x.gather(-1, perm)


def duplicates(q_bucket: Tensor, k_bucket: Tensor, q_perm: Tensor, k_perm: Tensor, cq: int, ck: int) -> Tensor:
    """For the bucket pairs of one round (sorted by ``q_perm``, ``k_perm`` (..., n)), how many rounds put each
    (query, key) pair in the same bucket: (..., n_b, cq, ck). ``q_bucket``/``k_bucket`` (R, ..., n) are every
    round's bucket ids. Loops over rounds: memory is one round's bucket blocks."""
    count = None
    for qb, kb in zip(q_bucket, k_bucket):
        sq = take1(qb, q_perm).unflatten(-1, (-1, cq))
        sk = take1(kb, k_perm).unflatten(-1, (-1, ck))
        same = sq.unsqueeze(-1) == sk.unsqueeze(-2)
        count = same.to(torch.int32) if count is None else count + same
    return count
