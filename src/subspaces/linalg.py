"""Shared linear-algebra kernels: truncated SVD, orthonormal bases, projections, principal angles.

Every family builds on one notion: an orthonormal basis ``Q`` (m, r) and the projections onto
``span(Q)`` and onto its orthogonal complement. GaLore keeps the top gradient subspace, Sculpting
Subspaces and OPCM project away from a protected one, LoRA-XS / SVFit / SALT start from a weight's
singular subspace, compression truncates to it. These functions are written once, here.

Device and dtype rules (all functions):

* Any device; nothing is moved except where a ``generator`` lives on another device.
* ``torch.linalg`` has no SVD / QR for float16 or bfloat16, so those inputs are factorized in
  float32 and the results cast back to the input dtype. Integer inputs are factorized and returned
  in ``torch.get_default_dtype()``.
* Leading batch dimensions ``(..., m, n)`` are accepted wherever a matrix is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "truncated_svd",
    "orthonormal_basis",
    "project",
    "project_out",
    "principal_angles",
    "subspace_overlap",
    "tucker_product",
]

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch.linalg can factorize a tensor of ``dtype`` in."""
    if dtype in _HALF:
        return torch.float32
    if dtype.is_floating_point or dtype.is_complex:
        return dtype
    return torch.get_default_dtype()


def _result_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if (dtype.is_floating_point or dtype.is_complex) else torch.get_default_dtype()


def _check_matrix(name: str, X: Tensor) -> None:
    if not isinstance(X, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(X).__name__}")
    if X.ndim < 2:
        raise ValueError(f"{name} must have shape (..., m, n) with at least 2 dimensions, got shape {tuple(X.shape)}")


def _check_rank(rank: int, m: int, n: int) -> None:
    k = min(m, n)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= k:
        raise ValueError(f"rank={rank!r} is not allowed for a ({m}, {n}) matrix: use an integer in [1, {k}]")


def truncated_svd(
    W: Tensor,
    rank: int,
    *,
    method: Literal["exact", "randomized"] = "exact",
    oversample: int = 10,
    n_iter: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of ``W`` (..., m, n): ``W ≈ U @ diag(S) @ Vh``.

    Args:
        W: matrix (..., m, n), e.g. an ``nn.Linear`` weight (out, in).
        rank: number of triplets kept, ``1 <= rank <= min(m, n)``.
        method: ``"exact"`` (``torch.linalg.svd``, then truncate) or ``"randomized"``
            (Halko, Martinsson & Tropp 2011, "Finding structure with randomness", Alg. 4.4,
            https://arxiv.org/abs/0909.4061: a Gaussian sketch of width ``rank + oversample``,
            ``n_iter`` power iterations re-orthonormalized by QR, then an exact SVD of the
            small projected matrix).
        oversample: extra sketch columns for ``"randomized"`` (ignored by ``"exact"``).
        n_iter: power iterations for ``"randomized"``; more helps when the spectrum decays slowly.
        generator: source of the random sketch, for reproducibility.

    Returns:
        ``U`` (..., m, rank) with orthonormal columns, ``S`` (..., rank) descending and
        non-negative, ``Vh`` (..., rank, n) with orthonormal rows; all in ``W``'s dtype
        (``S`` in the matching real dtype for complex ``W``).
    """
    _check_matrix("W", W)
    m, n = W.shape[-2:]
    _check_rank(rank, m, n)
    if method not in ("exact", "randomized"):
        raise ValueError(f"method={method!r} is not allowed: use 'exact' or 'randomized'")
    if oversample < 0 or n_iter < 0:
        raise ValueError(f"oversample={oversample} and n_iter={n_iter} must both be >= 0")

    out = _result_dtype(W.dtype)
    A = W.to(_compute_dtype(W.dtype))
    if method == "exact":
        U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    else:
        k = min(rank + oversample, m, n)
        # Draw on the generator's device so a CPU generator works for a CUDA matrix.
        dev = generator.device if generator is not None else A.device
        omega = torch.randn(*A.shape[:-2], n, k, dtype=A.dtype, device=dev, generator=generator).to(A.device)
        Q = torch.linalg.qr(A @ omega).Q
        for _ in range(n_iter):
            # Re-orthonormalizing each half-step keeps small singular directions from being
            # lost to round-off (Halko et al. §4.5).
            Z = torch.linalg.qr(A.mH @ Q).Q
            Q = torch.linalg.qr(A @ Z).Q
        Ub, S, Vh = torch.linalg.svd(Q.mH @ A, full_matrices=False)
        U = Q @ Ub
    U, S, Vh = U[..., :, :rank], S[..., :rank], Vh[..., :rank, :]
    return U.to(out), S.to(out.to_real()), Vh.to(out)


def orthonormal_basis(M: Tensor, rank: int | None = None) -> Tensor:
    """Orthonormal columns spanning the column space of ``M`` (..., m, n).

    Without ``rank``: the reduced QR factor, shape (..., m, min(m, n)). It spans the column space
    when ``M`` has full column rank; for rank-deficient ``M`` it spans a superspace of it, so pass
    ``rank`` then. With ``rank``: the top-``rank`` left singular vectors (..., m, rank), i.e. the
    best rank-``rank`` subspace in the Eckart–Young sense. Returned in ``M``'s dtype.
    """
    _check_matrix("M", M)
    if rank is not None:
        return truncated_svd(M, rank)[0]
    return torch.linalg.qr(M.to(_compute_dtype(M.dtype))).Q.to(_result_dtype(M.dtype))


def _check_side(side: str) -> None:
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r} is not allowed: use 'left' or 'right'")


def project(X: Tensor, Q: Tensor, *, side: Literal["left", "right"] = "left") -> Tensor:
    """Orthogonal projection of ``X`` onto ``span(Q)``.

    ``side="left"``: ``Q Qᴴ X`` projects the columns of ``X`` (..., m, n), with ``Q`` (m, r).
    ``side="right"``: ``X Q Qᴴ`` projects the rows of ``X`` (..., m, n), with ``Q`` (n, r).
    ``Q`` must have orthonormal columns (see :func:`orthonormal_basis`); it is cast to ``X``'s
    dtype, and the result has ``X``'s dtype. Computed as two thin products, never forming ``Q Qᴴ``.
    """
    _check_side(side)
    Q = Q.to(X.dtype)
    if side == "left":
        return Q @ (Q.mH @ X)
    return (X @ Q) @ Q.mH


def project_out(X: Tensor, Q: Tensor, *, side: Literal["left", "right"] = "left") -> Tensor:
    """Projection of ``X`` onto the orthogonal complement of ``span(Q)``: ``X - project(X, Q)``.

    Same shapes and ``side`` convention as :func:`project`; ``project(X, Q) + project_out(X, Q) == X``.
    """
    return X - project(X, Q, side=side)


def _cosines(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Orthonormal bases Qa, Qb (Qa the wider) and the cosines of the principal angles, descending."""
    _check_matrix("A", A)
    _check_matrix("B", B)
    if A.shape[-2] != B.shape[-2]:
        raise ValueError(f"A {tuple(A.shape)} and B {tuple(B.shape)} must have the same number of rows (ambient dimension)")
    dt = _compute_dtype(torch.promote_types(A.dtype, B.dtype))
    Qa = torch.linalg.qr(A.to(dt)).Q
    Qb = torch.linalg.qr(B.to(dt)).Q
    if Qa.shape[-1] < Qb.shape[-1]:
        Qa, Qb = Qb, Qa
    return Qa, Qb, torch.linalg.svdvals(Qa.mH @ Qb)


def principal_angles(A: Tensor, B: Tensor) -> Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``A`` (..., m, p) and ``B`` (..., m, q).

    Björck & Golub 1973, "Numerical methods for computing angles between linear subspaces",
    Math. Comp. 27(123), https://doi.org/10.1090/S0025-5718-1973-0348991-3: orthonormalize both
    by QR, then the singular values of ``Qaᴴ Qb`` are the cosines. Angles below π/4 are taken from
    the sines instead (singular values of ``Qb - Qa Qaᴴ Qb``, Knyazev & Argentati 2002,
    https://doi.org/10.1137/S1064827500377332), since arccos loses half the digits near 0.
    As in ``scipy.linalg.subspace_angles``. ``A`` and ``B`` should have full column rank.

    Returns ``min(p, q)`` angles in [0, π/2], in the promoted input dtype.
    """
    Qa, Qb, cos = _cosines(A, B)
    sin = torch.linalg.svdvals(Qb - Qa @ (Qa.mH @ Qb))  # descending sines = descending angles
    small = torch.arcsin(sin.clamp(-1, 1)).flip(-1)
    theta = torch.where(cos**2 >= 0.5, small, torch.arccos(cos.clamp(-1, 1)))
    return theta.to(_result_dtype(torch.promote_types(A.dtype, B.dtype)))


def subspace_overlap(A: Tensor, B: Tensor) -> Tensor:
    """Mean squared cosine of the principal angles between the column spaces of ``A`` and ``B``.

    In [0, 1]: 1 when the smaller subspace lies inside the larger, 0 when they are orthogonal.
    Equals ``||Qaᴴ Qb||_F² / min(p, q)``. Returned in the promoted input dtype, shape (...,).
    """
    _, _, cos = _cosines(A, B)
    return (cos**2).mean(-1).to(_result_dtype(torch.promote_types(A.dtype, B.dtype)))


def tucker_product(core: Tensor, factors: Sequence[Tensor | None]) -> Tensor:
    """The Tucker product ``core ×_1 U_1 ×_2 U_2 … ×_N U_N`` (Kolda & Bader 2009, "Tensor Decompositions and
    Applications", SIAM Review 51(3), https://doi.org/10.1137/07070111X, mode-n product).

    ``core`` (r_1, …, r_N); ``factors[n]`` (d_n, r_n), or None to leave mode n as it is. Returns
    (d_1, …, d_N) with ``out[i_1..i_N] = Σ_a core[a_1..a_N] Π_n U_n[i_n, a_n]``; factors share the core's dtype.
    """
    if len(factors) != core.ndim:
        raise ValueError(f"tucker_product: {len(factors)} factors for a core with {core.ndim} modes; "
                         "give one (d_n, r_n) matrix or None per mode")
    out = core
    for n, U in enumerate(factors):
        if U is None:
            continue
        if U.ndim != 2 or U.shape[1] != core.shape[n]:
            raise ValueError(f"tucker_product: factor {n} has shape {tuple(U.shape)}; "
                             f"expected (d, {core.shape[n]}) to match the core's mode {n}")
        out = torch.movedim(torch.tensordot(out, U, dims=([n], [1])), -1, n)
    return out
