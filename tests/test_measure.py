"""Tests for subspaces.measure against numpy / scipy references."""

import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import subspaces.linalg
import subspaces.measure as measure


def np_effective_rank(W):
    s = np.linalg.svd(W, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectrum_matches_numpy(dtype):
    torch.manual_seed(0)
    W = torch.randn(12, 7, dtype=dtype)
    s = measure.spectrum(W)
    assert s.shape == (7,) and s.dtype == dtype
    assert torch.all(s[:-1] >= s[1:])
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(W.numpy(), compute_uv=False), rtol=1e-5)


def test_spectrum_conv_kernel_is_reshaped_to_out_by_rest():
    torch.manual_seed(0)
    K = torch.randn(6, 3, 3, 3)
    s = measure.spectrum(K)
    assert s.shape == (6,)
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(K.reshape(6, 27).numpy(), compute_uv=False), rtol=1e-5)


def test_spectrum_bf16_and_bad_input():
    torch.manual_seed(0)
    W = torch.randn(8, 5)
    s = measure.spectrum(W.bfloat16())
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, torch.linalg.svdvals(W.bfloat16().float()))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        measure.spectrum(torch.randn(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_effective_rank_matches_numpy(dtype):
    torch.manual_seed(0)
    W = torch.randn(20, 10, dtype=dtype) @ torch.diag(torch.logspace(0, -2, 10, dtype=dtype))
    ref = np_effective_rank(W.double().numpy())
    assert measure.effective_rank(W) == pytest.approx(ref, rel=1e-5)
    # A vector is read as singular values already.
    assert measure.effective_rank(measure.spectrum(W)) == pytest.approx(ref, rel=1e-5)


def test_effective_rank_known_values():
    assert measure.effective_rank(torch.ones(5)) == pytest.approx(5.0)
    assert measure.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    # Two equal values and one zero: entropy log 2.
    assert measure.effective_rank(torch.tensor([1.0, 1.0, 0.0])) == pytest.approx(2.0)
    u = torch.randn(7, 1)
    assert measure.effective_rank(u @ torch.randn(1, 4)) == pytest.approx(1.0, abs=1e-5)
    assert measure.effective_rank(torch.zeros(3, 3)) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        measure.effective_rank(torch.tensor([1.0, -1.0]))


def test_stable_rank_matches_norms():
    torch.manual_seed(0)
    W = torch.randn(15, 9, dtype=torch.float64)
    Wn = W.numpy()
    ref = np.linalg.norm(Wn, "fro") ** 2 / np.linalg.norm(Wn, 2) ** 2
    assert measure.stable_rank(W) == pytest.approx(ref, rel=1e-10)
    assert measure.stable_rank(torch.eye(4)) == pytest.approx(4.0)
    assert measure.stable_rank(torch.tensor([2.0, 1.0])) == pytest.approx(1.25)
    assert measure.stable_rank(torch.zeros(2, 3)) == 0.0


def test_principal_angles_is_reexported():
    assert measure.principal_angles is subspaces.linalg.principal_angles
    torch.manual_seed(0)
    A, B = torch.randn(9, 3, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    ref = np.sort(scipy.linalg.subspace_angles(A.numpy(), B.numpy()))
    np.testing.assert_allclose(measure.principal_angles(A, B).numpy(), ref, atol=1e-10)


def test_import_is_cheap():
    code = (
        "import sys, subspaces.measure; "
        "bad = [m for m in ('scipy', 'transformers') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + proc.stdout


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 8), n=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_property_rank_bounds(m, n, seed):
    W = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    er, sr = measure.effective_rank(W), measure.stable_rank(W)
    # Roy & Vetterli: 1 <= erank <= rank; stable rank lies in [1, rank] too.
    k = min(m, n)
    assert 1 - 1e-9 <= er <= k + 1e-9
    assert 1 - 1e-9 <= sr <= k + 1e-9
    assert er == pytest.approx(np_effective_rank(W.numpy()), rel=1e-9)
    # Both are scale invariant.
    assert measure.effective_rank(3.5 * W) == pytest.approx(er, rel=1e-9)
    assert measure.stable_rank(3.5 * W) == pytest.approx(sr, rel=1e-9)
    assert not math.isnan(er)
