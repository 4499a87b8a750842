"""Performer positive random features (FAVOR+) in log scale, and linear attention (plain and causal): the low-rank
part of Scatterbrain (``compress/scatterbrain.py``).

Choromanski et al., "Rethinking Attention with Performers", ICLR 2021, https://arxiv.org/abs/2009.14794:
exp(τ q·k) = E_ω[φ(q)ᵀφ(k)] with φ(x) = exp(Ωx̃ − ‖x̃‖²/2)/√m, x̃ = √τ·x, rows ω of Ω marginally N(0, I).

Features are returned as (φ / e^s, s): queries with one log-scale s per row (the row's largest log-feature), keys
with one s per (batch, head) over all valid keys, so every stored feature lies in [0, 1] and exp never overflows.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def orthogonal_gaussian(m: int, d: int, *, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """Ω (m, d): blocks of d orthonormal rows (Haar, from QR of a Gaussian), each row rescaled by the norm of an
    independent N(0, I_d) draw, so every row is marginally N(0, I_d) (unbiased) and rows within a block are
    orthogonal (lower variance). Drawn on the generator's device (CPU without one)."""
    device = generator.device if generator is not None else torch.device("cpu")
    blocks = []
    for start in range(0, m, d):
        g = torch.randn(d, d, generator=generator, dtype=dtype, device=device)
        q, r = torch.linalg.qr(g)
        q = q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed columns
        blocks.append(q.T[: m - start])
    norms = torch.randn(m, d, generator=generator, dtype=dtype, device=device).norm(dim=1, keepdim=True)
    return torch.cat(blocks) * norms


def log_features(x: Tensor, omega: Tensor, scale: float) -> Tensor:
    """log φ(x) = Ωx̃ − ‖x̃‖²/2 − ½ log m, x̃ = √τ·x: (..., n, d) -> (..., n, m)."""
    xs = x * math.sqrt(scale)
    return xs @ omega.T - xs.square().sum(-1, keepdim=True) / 2 - math.log(omega.shape[0]) / 2


def query_features(q: Tensor, omega: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(φ(q)·e^{−s}, s) with s (..., n) the row maximum of log φ(q)."""
    lg = log_features(q, omega, scale)
    s = lg.amax(-1, keepdim=True)
    return torch.exp(lg - s), s.squeeze(-1)


def key_features(k: Tensor, omega: Tensor, scale: float, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(φ(k)·e^{−s}, s) with s (..., 1) the maximum of log φ(k) over all valid keys and features; invalid keys
    (``valid`` False, broadcast to (..., n)) get φ = 0 and do not set the scale."""
    lg = log_features(k, omega, scale)
    if valid is not None:
        lg = lg.masked_fill(~valid.unsqueeze(-1), -math.inf)
    s = lg.amax((-1, -2), keepdim=True)
    s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))  # no valid key: φ = 0 everywhere, any scale
    return torch.exp(lg - s), s.squeeze(-1)


def linear_attention(phq: Tensor, phk: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Non-causal (φ(Q)(φ(K)ᵀV), φ(Q)(φ(K)ᵀ1)): (..., n_q, d_v), (..., n_q); no n_q × n_k tensor."""
    return phq @ (phk.transpose(-1, -2) @ v), (phq @ phk.sum(-2).unsqueeze(-1))[..., 0]


def causal_linear_attention(phq: Tensor, phk: Tensor, v: Tensor, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Causal prefix-sum linear attention: query i (at position i + n_k − n_q) sees keys j ≤ i + n_k − n_q.

    Chunked: a running state Σ φ(k_j) v_jᵀ (m, d_v) carries the earlier chunks, and each chunk's own
    (chunk × chunk) lower triangle is done densely, so memory is O(n·(m + d_v) + chunk²), never n × n or n·m·d_v.
    """
    nq, nk = phq.shape[-2], phk.shape[-2]
    off = nk - nq
    state = phk[..., :off, :].transpose(-1, -2) @ v[..., :off, :]
    z = phk[..., :off, :].sum(-2)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=phq.device).tril()
    nums, dens = [], []
    for s in range(0, nq, chunk):
        e = min(s + chunk, nq)
        qc, kc, vc = phq[..., s:e, :], phk[..., off + s:off + e, :], v[..., off + s:off + e, :]
        a = (qc @ kc.transpose(-1, -2)).masked_fill(~tri[: e - s, : e - s], 0.0)
        nums.append(qc @ state + a @ vc)
        dens.append((qc @ z.unsqueeze(-1))[..., 0] + a.sum(-1))
        state = state + kc.transpose(-1, -2) @ vc
        z = z + kc.sum(-2)
    if not nums:
        return phq.new_zeros(*phq.shape[:-1], v.shape[-1]), phq.new_zeros(phq.shape[:-1])
    return torch.cat(nums, -2), torch.cat(dens, -1)
