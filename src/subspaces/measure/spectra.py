"""Spectra of weight matrices and the scalar ranks read off them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from subspaces.linalg import _compute_dtype

__all__ = ["spectrum", "effective_rank", "stable_rank"]


def spectrum(W: Tensor) -> Tensor:
    """Singular values of ``W``, descending.

    Weight spectra as a diagnostic of training: Martin & Mahoney 2021, "Implicit self-regularization
    in deep neural networks: evidence from random matrix theory and implications for learning",
    JMLR 22(165), https://arxiv.org/abs/1810.01075 (their empirical spectral density is that of
    ``WᵀW``, i.e. these values squared).

    ``W`` is a matrix (out, in). A tensor with more than two dimensions, such as a conv kernel
    (out, in, kh, kw), is read as the matrix (out, in·kh·kw), ``W.reshape(W.shape[0], -1)``: the
    map from a flattened receptive field to output channels. (WeightWatcher instead takes the
    kh·kw slices (out, in) separately; do that yourself if you want it.)

    Returns a 1-D tensor of length ``min(out, in)`` on ``W``'s device: float64 for float64 input,
    float32 for float32 / half input, the default dtype for integer input,
    the real dtype for complex input. Gradients flow.
    """
    if not isinstance(W, Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 2:
        raise ValueError(f"W must have at least 2 dimensions (out, in, ...), got shape {tuple(W.shape)}")
    if W.ndim > 2:
        W = W.reshape(W.shape[0], -1)
    return torch.linalg.svdvals(W.to(_compute_dtype(W.dtype)))


def _singular_values(W_or_S: Tensor) -> Tensor:
    """A 1-D tensor is taken as singular values already; anything larger goes through spectrum()."""
    if isinstance(W_or_S, Tensor) and W_or_S.ndim == 1:
        S = W_or_S.abs() if W_or_S.is_complex() else W_or_S
        if (S < 0).any():
            raise ValueError("singular values must be non-negative; to get them, pass the matrix itself")
        return S
    return spectrum(W_or_S)


def effective_rank(W_or_S: Tensor) -> float:
    """Entropy effective rank ``exp(H(p))`` with ``p = s / Σ s``.

    Roy & Vetterli 2007, "The effective rank: a measure of effective dimensionality", 15th European
    Signal Processing Conference (EUSIPCO), pp. 606-610, https://infoscience.epfl.ch/record/110188. Ranges over [1, min(out, in)]: 1 for a rank-1
    matrix, ``min(out, in)`` when all singular values are equal. Terms with ``p = 0`` contribute 0.

    Args:
        W_or_S: a matrix (out, in) (or a conv kernel, see :func:`spectrum`), or a 1-D tensor of
            its singular values.

    Returns 0.0 for the zero matrix, whose effective rank the definition leaves undefined.
    """
    S = _singular_values(W_or_S).double()
    total = S.sum()
    if total == 0:
        return 0.0
    p = S / total
    return math.exp(-torch.special.xlogy(p, p).sum().item())


def stable_rank(W_or_S: Tensor) -> float:
    """Stable rank ``||W||_F² / ||W||_2² = Σ sᵢ² / s₁²``.

    Rudelson & Vershynin 2007, "Sampling from large matrices: an approach through geometric
    functional analysis", J. ACM 54(4), https://arxiv.org/abs/math/0503442. At most the rank, and
    insensitive to small singular values. Accepts a matrix or a 1-D tensor of singular values.
    Returns 0.0 for the zero matrix.
    """
    S = _singular_values(W_or_S).double()
    top = S.max()
    if top == 0:
        return 0.0
    return ((S / top) ** 2).sum().item()
