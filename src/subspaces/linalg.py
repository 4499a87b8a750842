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


# --- Walsh–Hadamard transform and the Fastfood projection (intrinsic-dimension adapters) --------------------------

_HADAMARDS: dict[tuple, Tensor] = {}  # (k, dtype, device) -> H_k, read only

_FWHT_BLOCK = 5  # Kronecker factors of size 2^5: 32x32 matmuls beat log2(L) butterfly passes in pure torch on CPU


def _hadamard(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The k×k Sylvester Hadamard matrix (k a power of two), the order of ``scipy.linalg.hadamard``."""
    key = (k, dtype, device)
    H = _HADAMARDS.get(key)
    if H is None:
        H = torch.ones(1, 1, dtype=dtype, device=device)
        while H.shape[0] < k:
            H = torch.cat((torch.cat((H, H), 1), torch.cat((H, -H), 1)), 0)
        _HADAMARDS[key] = H
    return H


def fwht(x: Tensor) -> Tensor:
    """Unnormalized fast Walsh–Hadamard transform over the last dimension: ``x @ H_L`` with ``H_L`` the Sylvester
    Hadamard matrix (entries ±1, ``H_L @ H_L = L·I``), for any power-of-two length L (leading dims are a batch).

    ``H_L = H_{k1} ⊗ H_{k2} ⊗ …``, so the transform applies small Hadamard matrices (k ≤ 32) along the axes of
    ``x`` viewed as (k1, k2, …): O(L·log L) work done as a few matmuls, pure torch, differentiable, any device.
    Returns ``x``'s dtype and shape.
    """
    L = x.shape[-1]
    if L < 1 or L & (L - 1):
        raise ValueError(f"fwht: the last dimension must be a power of two, got {L}")
    lead = x.shape[:-1]
    y = x.reshape(-1, L)
    n, pre, post = y.shape[0], 1, L
    bits = L.bit_length() - 1
    while post > 1:
        k = 1 << min(_FWHT_BLOCK, bits)
        bits -= k.bit_length() - 1
        post //= k
        H = _hadamard(k, y.dtype, y.device)
        # H is symmetric: the last axis takes y @ H (one large matmul), inner axes a batched H @ y
        y = y.reshape(-1, k) @ H if post == 1 else torch.matmul(H, y.reshape(n * pre, k, post))
        pre *= k
    return y.reshape(*lead, L)


def _fwht_padded(v: Tensor, L: int) -> Tensor:
    """``fwht(pad(v, L))`` for v (..., n), n ≤ L, without transforming the zeros: with H_L = H_k ⊗ H_{L/k}, only
    the r = ⌈n·k/L⌉ non-zero rows of the (k, L/k) view need the inner transform."""
    n, k = v.shape[-1], min(L, 1 << _FWHT_BLOCK)
    M = L // k
    r = -(-n // M)
    y = fwht(torch.nn.functional.pad(v, (0, r * M - n)).reshape(*v.shape[:-1], r, M))
    return (_hadamard(k, v.dtype, v.device)[:, :r] @ y).reshape(*v.shape[:-1], L)


def _fwht_head(x: Tensor, n: int) -> Tensor:
    """``fwht(x)[..., :n]``: the outer factor first, restricted to the ⌈n·k/L⌉ rows kept, then the inner one."""
    L = x.shape[-1]
    k = min(L, 1 << _FWHT_BLOCK)
    M = L // k
    r = -(-n // M)
    y = _hadamard(k, x.dtype, x.device)[:r] @ x.reshape(*x.shape[:-1], k, M)
    return fwht(y).reshape(*x.shape[:-1], r * M)[..., :n]


class _FastfoodFn(torch.autograd.Function):
    """P θ and its adjoint Pᵀ g, both implicit, so backward keeps nothing but the operator's seeded vectors."""

    @staticmethod
    def forward(ctx, theta: Tensor, op: Fastfood) -> Tensor:
        ctx.op, ctx.d = op, theta.shape[-1]
        return op._project(theta)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        return ctx.op._adjoint(grad, ctx.d), None


class Fastfood(torch.nn.Module):
    """Seeded implicit random projection ``P: R^d → R^D`` (Fastfood, Le, Sarlós & Smola, ICML 2013,
    https://proceedings.mlr.press/v28/le13.html), normalized as in Li et al. 2018 (https://arxiv.org/abs/1804.08838)::

        P θ = (H G Π H B pad_L(θ))[:D] / (√(L·ΣG²) · √(D/L)),   L = 2^⌈log2 D⌉

    with B = diag(±1), Π a permutation ((Π v)_i = v[perm_i]), G = diag(N(0, 1)) and H the unnormalized
    Walsh–Hadamard matrix (:func:`fwht`); each column of P has norm ≈ 1. O(L log L) per product, nothing of size
    D×d is stored. B, Π, G are drawn from ``seed`` on a CPU generator (identical on every device) and kept as
    non-persistent buffers (regenerated, never saved). Gradients use the exact adjoint (``adjoint``).

    ``pad_L`` zero-pads θ to L; for d > L it keeps only θ[:L] (the columns beyond L are zero), reproducing the
    reference code's ``F.pad`` with a negative width (Aghajanyan et al.'s per-tensor projection of small tensors).
    """

    def __init__(self, D: int, *, seed: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if isinstance(D, bool) or not isinstance(D, int) or D < 1:
            raise ValueError(f"Fastfood: D={D!r} must be a positive integer")
        self.D, self.L = D, 1 << (D - 1).bit_length()
        g = torch.Generator().manual_seed(seed)
        B = torch.randint(0, 2, (self.L,), generator=g, dtype=torch.int8) * 2 - 1
        perm = torch.randperm(self.L, generator=g)
        G = torch.randn(self.L, generator=g, dtype=torch.float64)
        self.divisor = (D * float(G.square().sum())) ** 0.5  # √(L·ΣG²)·√(D/L)
        self.register_buffer("B", B.to(device), persistent=False)
        self.register_buffer("perm", perm.to(device), persistent=False)
        self.register_buffer("G", G.to(device=device, dtype=dtype), persistent=False)

    # Only the first min(d, L) inputs and the first D outputs are non-zero / needed: both Hadamard transforms
    # skip the rest (_fwht_padded, _fwht_head), which matters when d ≪ L.
    def _project(self, theta: Tensor) -> Tensor:
        n = min(theta.shape[-1], self.L)
        v = _fwht_padded(theta[..., :n] * self.B[:n].to(theta.dtype), self.L)
        v = v.index_select(-1, self.perm) * self.G.to(theta.dtype)  # Π (index_select: ~8x advanced indexing)
        return _fwht_head(v, self.D) / self.divisor

    def _adjoint(self, grad: Tensor, d: int) -> Tensor:
        v = _fwht_padded(grad / self.divisor, self.L) * self.G.to(grad.dtype)
        u = torch.empty_like(v).index_copy_(-1, self.perm, v)  # Πᵀ
        n = min(d, self.L)
        u = _fwht_head(u, n) * self.B[:n].to(grad.dtype)
        return torch.nn.functional.pad(u, (0, d - n))

    def forward(self, theta: Tensor) -> Tensor:
        """``P θ`` for θ of shape (..., d): shape (..., D), differentiable in θ."""
        return _FastfoodFn.apply(theta, self)

    def adjoint(self, grad: Tensor, d: int) -> Tensor:
        """``Pᵀ g`` for g of shape (..., D): shape (..., d)."""
        return self._adjoint(grad, d)

    def matrix(self, d: int, *, dtype: torch.dtype | None = None) -> Tensor:
        """P materialized, shape (D, d) (for tests and small D only)."""
        eye = torch.eye(d, dtype=dtype or self.G.dtype, device=self.G.device)
        return self._project(eye).T


__all__ += ["fwht", "Fastfood"]
