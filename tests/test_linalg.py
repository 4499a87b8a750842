"""Tests for subspaces.linalg against numpy / scipy references."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from subspaces.linalg import (
    orthonormal_basis,
    principal_angles,
    project,
    project_out,
    subspace_overlap,
    truncated_svd,
)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


def low_rank_plus_noise(m, n, r, noise, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(m, r, generator=g, dtype=dtype) @ torch.randn(r, n, generator=g, dtype=dtype)
    return L + noise * torch.randn(m, n, generator=g, dtype=dtype)


def assert_orthonormal_columns(Q, tol):
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype)
    torch.testing.assert_close(Q.mT @ Q, eye, atol=tol, rtol=0)


# --- truncated_svd -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_exact_svd_matches_numpy(dtype, shape):
    torch.manual_seed(0)
    W = torch.randn(*shape, dtype=dtype)
    U, S, Vh = truncated_svd(W, 5)
    assert U.shape == (shape[0], 5) and S.shape == (5,) and Vh.shape == (5, shape[1])
    assert U.dtype == S.dtype == Vh.dtype == dtype
    s_np = np.linalg.svd(W.numpy(), compute_uv=False)[:5]
    np.testing.assert_allclose(S.numpy(), s_np, rtol=TOL[dtype])
    assert_orthonormal_columns(U, TOL[dtype])
    assert_orthonormal_columns(Vh.mT, TOL[dtype])
    # Eckart–Young: the rank-5 error is the tail of the spectrum.
    err = torch.linalg.matrix_norm(W - U @ torch.diag(S) @ Vh)
    tail = np.sqrt((np.linalg.svd(W.numpy(), compute_uv=False)[5:] ** 2).sum())
    assert err.item() == pytest.approx(tail, rel=TOL[dtype] * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_randomized_svd_close_to_exact_on_low_rank_plus_noise(dtype):
    W = low_rank_plus_noise(200, 120, 8, noise=1e-3, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    U, S, Vh = truncated_svd(W, 8, method="randomized", generator=g)
    Ue, Se, Vhe = truncated_svd(W, 8)
    err_rand = torch.linalg.matrix_norm(W - U @ torch.diag(S) @ Vh).item()
    err_exact = torch.linalg.matrix_norm(W - Ue @ torch.diag(Se) @ Vhe).item()
    assert err_rand <= 1.01 * err_exact
    torch.testing.assert_close(S, Se, rtol=1e-4, atol=0)
    assert_orthonormal_columns(U, TOL[dtype])
    assert subspace_overlap(U, Ue).item() > 1 - 1e-4


def test_randomized_svd_power_iterations_help_on_flat_spectrum():
    # A slowly decaying spectrum is where power iterations matter (Halko et al. §4.5).
    torch.manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(300, 100, dtype=torch.float64))
    Q2, _ = torch.linalg.qr(torch.randn(100, 100, dtype=torch.float64))
    W = Q1 @ torch.diag(1.0 / torch.arange(1, 101, dtype=torch.float64).sqrt()) @ Q2.T

    def err(n_iter):
        g = torch.Generator().manual_seed(3)
        U, S, Vh = truncated_svd(W, 10, method="randomized", oversample=2, n_iter=n_iter, generator=g)
        return torch.linalg.matrix_norm(W - U @ torch.diag(S) @ Vh).item()

    assert err(4) < err(0)


def test_randomized_svd_is_reproducible_with_generator():
    W = low_rank_plus_noise(40, 30, 4, noise=0.1)
    a = truncated_svd(W, 4, method="randomized", generator=torch.Generator().manual_seed(7))
    b = truncated_svd(W, 4, method="randomized", generator=torch.Generator().manual_seed(7))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_half_precision_input_returns_input_dtype(half, method):
    W = low_rank_plus_noise(32, 24, 3, noise=1e-2, dtype=torch.float32)
    U, S, Vh = truncated_svd(W.to(half), 3, method=method)
    assert U.dtype == S.dtype == Vh.dtype == half
    ref = torch.linalg.svdvals(W)[:3]
    torch.testing.assert_close(S.float(), ref, rtol=2e-2, atol=0)


def test_batched_svd():
    torch.manual_seed(0)
    W = torch.randn(3, 10, 8, dtype=torch.float64)
    U, S, Vh = truncated_svd(W, 4)
    assert U.shape == (3, 10, 4) and S.shape == (3, 4) and Vh.shape == (3, 4, 8)
    for i in range(3):
        np.testing.assert_allclose(S[i].numpy(), np.linalg.svd(W[i].numpy(), compute_uv=False)[:4])


@pytest.mark.parametrize("rank", [0, -1, 9, 2.5, True])
def test_bad_rank_raises(rank):
    with pytest.raises(ValueError, match=r"rank=.*\[1, 8\]"):
        truncated_svd(torch.randn(8, 10), rank)


def test_bad_method_and_shape_raise():
    with pytest.raises(ValueError, match="method='lanczos'.*exact.*randomized"):
        truncated_svd(torch.randn(8, 10), 2, method="lanczos")
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        truncated_svd(torch.randn(8), 1)


# --- orthonormal_basis, project, project_out -----------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_orthonormal_basis_spans_columns(dtype):
    torch.manual_seed(0)
    M = torch.randn(15, 4, dtype=dtype)
    Q = orthonormal_basis(M)
    assert Q.shape == (15, 4) and Q.dtype == dtype
    assert_orthonormal_columns(Q, TOL[dtype])
    # M lies in span(Q): projecting changes nothing.
    torch.testing.assert_close(project(M, Q), M, atol=TOL[dtype] * 10, rtol=0)


def test_orthonormal_basis_with_rank_is_top_singular_subspace():
    W = low_rank_plus_noise(30, 20, 3, noise=1e-3)
    Q = orthonormal_basis(W, rank=3)
    U_np = np.linalg.svd(W.numpy())[0][:, :3]
    assert Q.shape == (30, 3)
    assert np.max(scipy.linalg.subspace_angles(Q.numpy(), U_np)) < 1e-8


def test_orthonormal_basis_bf16():
    Q = orthonormal_basis(torch.randn(16, 4).bfloat16())
    assert Q.dtype == torch.bfloat16
    assert_orthonormal_columns(Q.float(), 2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_project_left_and_right(dtype):
    torch.manual_seed(0)
    X = torch.randn(12, 9, dtype=dtype)
    Ql = orthonormal_basis(torch.randn(12, 3, dtype=dtype))
    Qr = orthonormal_basis(torch.randn(9, 2, dtype=dtype))
    np.testing.assert_allclose(project(X, Ql).numpy(), Ql.numpy() @ Ql.numpy().T @ X.numpy(), atol=TOL[dtype])
    np.testing.assert_allclose(
        project(X, Qr, side="right").numpy(), X.numpy() @ Qr.numpy() @ Qr.numpy().T, atol=TOL[dtype]
    )
    for Q, side in [(Ql, "left"), (Qr, "right")]:
        P, R = project(X, Q, side=side), project_out(X, Q, side=side)
        torch.testing.assert_close(P + R, X)
        # The complement part is orthogonal to span(Q); projecting twice changes nothing.
        inner = Q.mT @ R if side == "left" else R @ Q
        assert inner.abs().max().item() < TOL[dtype] * 10
        torch.testing.assert_close(project(P, Q, side=side), P, atol=TOL[dtype] * 10, rtol=0)


def test_project_bad_side_raises():
    with pytest.raises(ValueError, match="side='up'"):
        project(torch.randn(3, 3), torch.eye(3)[:, :1], side="up")


# --- principal_angles, subspace_overlap ----------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p,q", [(3, 5), (5, 3), (4, 4), (1, 2)])
def test_principal_angles_match_scipy(dtype, p, q):
    torch.manual_seed(p * 10 + q)
    A, B = torch.randn(20, p, dtype=dtype), torch.randn(20, q, dtype=dtype)
    theta = principal_angles(A, B)
    ref = np.sort(scipy.linalg.subspace_angles(A.double().numpy(), B.double().numpy()))
    assert theta.shape == (min(p, q),) and theta.dtype == dtype
    np.testing.assert_allclose(theta.numpy(), ref, atol=TOL[dtype] * 10)
    assert torch.all(theta[1:] >= theta[:-1])


def test_principal_angles_small_angles_are_accurate():
    # arccos alone would give ~1e-8 error here (sqrt of eps); the sine branch keeps full precision.
    torch.manual_seed(0)
    A = torch.randn(30, 3, dtype=torch.float64)
    B = A + 1e-9 * torch.randn(30, 3, dtype=torch.float64)
    theta = principal_angles(A, B)
    ref = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))
    assert ref.max() < 1e-8
    np.testing.assert_allclose(theta.numpy(), ref, rtol=1e-4, atol=1e-15)


def test_principal_angles_known_values():
    e = torch.eye(4, dtype=torch.float64)
    theta = principal_angles(e[:, :2], e[:, 2:])
    torch.testing.assert_close(theta, torch.full((2,), math.pi / 2, dtype=torch.float64))
    # A 45° rotation of e1 in the (e1, e3) plane, plus the shared e2.
    B = torch.stack([e[:, 0] + e[:, 2], e[:, 1]], dim=1)
    torch.testing.assert_close(principal_angles(e[:, :2], B), torch.tensor([0.0, math.pi / 4], dtype=torch.float64))
    assert subspace_overlap(e[:, :2], B).item() == pytest.approx(0.75)


def test_principal_angles_bf16_and_shape_mismatch():
    torch.manual_seed(0)
    A, B = torch.randn(16, 3), torch.randn(16, 2)
    theta = principal_angles(A.bfloat16(), B.bfloat16())
    assert theta.dtype == torch.bfloat16
    torch.testing.assert_close(theta.float(), principal_angles(A, B), atol=3e-2, rtol=0)
    with pytest.raises(ValueError, match="same number of rows"):
        principal_angles(torch.randn(5, 2), torch.randn(6, 2))


def test_subspace_overlap_matches_mean_cos2():
    torch.manual_seed(0)
    A, B = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 3, dtype=torch.float64)
    ref = np.mean(np.cos(scipy.linalg.subspace_angles(A.numpy(), B.numpy())) ** 2)
    assert subspace_overlap(A, B).item() == pytest.approx(ref, rel=1e-10)
    assert subspace_overlap(A, A).item() == pytest.approx(1.0)


# --- properties ------------------------------------------------------------------------------

dims = st.integers(min_value=1, max_value=8)


@settings(max_examples=30, deadline=None)
@given(m=dims, n=dims, data=st.data())
def test_property_truncated_svd_reconstructs_at_full_rank(m, n, data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    r = data.draw(st.integers(1, min(m, n)))
    method = data.draw(st.sampled_from(["exact", "randomized"]))
    U, S, Vh = truncated_svd(W, r, method=method, generator=torch.Generator().manual_seed(seed))
    assert torch.all(S[:-1] >= S[1:] - 1e-12) and torch.all(S >= 0)
    np.testing.assert_allclose(S.numpy(), np.linalg.svd(W.numpy(), compute_uv=False)[:r], rtol=1e-8, atol=1e-10)
    if r == min(m, n):
        torch.testing.assert_close(U @ torch.diag(S) @ Vh, W)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 10), p=dims, q=dims, seed=st.integers(0, 2**31 - 1))
def test_property_angles_are_symmetric_and_bounded(m, p, q, seed):
    p, q = min(p, m), min(q, m)
    g = torch.Generator().manual_seed(seed)
    A, B = torch.randn(m, p, dtype=torch.float64, generator=g), torch.randn(m, q, dtype=torch.float64, generator=g)
    theta = principal_angles(A, B)
    torch.testing.assert_close(theta, principal_angles(B, A))
    assert torch.all(theta >= 0) and torch.all(theta <= math.pi / 2 + 1e-12)
    # Invariant to the choice of basis: any invertible mix of A's columns spans the same space.
    mix = torch.randn(p, p, dtype=torch.float64, generator=g) + 3 * torch.eye(p, dtype=torch.float64)
    if torch.linalg.cond(mix) < 1e3:
        torch.testing.assert_close(principal_angles(A @ mix, B), theta, atol=1e-7, rtol=0)
    X = torch.randn(m, 3, dtype=torch.float64, generator=g)
    Q = orthonormal_basis(A)
    torch.testing.assert_close(project(X, Q) + project_out(X, Q), X)
