"""ℓp sensitivity / leverage row sampling (compress/sampling.py): the spec's faithful tests + streaming calibration."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.compress import _calibrate
from subspaces.compress.sampling import RowSampler, row_scores, sample_rows, sampling_error


def gauss(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def spectral_error(X: torch.Tensor, Xt: torch.Tensor) -> float:
    lam, V = torch.linalg.eigh(X.T @ X)
    W = V * lam.rsqrt()
    return float((torch.linalg.eigvalsh(W.T @ (Xt.T @ Xt) @ W) - 1).abs().max())


def outliers(n: int = 20000, d: int = 8, k: int = 3, seed: int = 0) -> torch.Tensor:
    """Bulk rows in the first d−1 coordinates; k rows alone carry the last one (high leverage)."""
    X = gauss(n, d, seed)
    X[:, -1] = 0
    X[:k] = 0
    X[:k, -1] = 5.0
    return X[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]


# faithful 1
@pytest.mark.parametrize("delta", [0.0, 1e-9])
def test_leverage_sums_to_rank_and_duplicates_share(delta):
    X = gauss(40, 6) @ gauss(6, 9, 1)  # rank 6 in 9 columns
    X[0] = 0
    X[0, 0] = 1.0  # will be given a direction of its own below
    X[1:, 0] = 0
    tau = row_scores(X, "leverage", delta=delta)
    tol = 1e-10 if delta == 0 else 1e-6
    assert abs(float(tau.sum()) - torch.linalg.matrix_rank(X).item()) < 100 * tol * X.shape[1]
    assert tau.min() >= -tol and tau.max() <= 1 + tol
    assert abs(float(tau[0]) - 1) < tol
    for k in (2, 5):
        Xk = torch.cat([X[:1].repeat(k, 1), X[1:]])
        tk = row_scores(Xk, "leverage", delta=delta)
        torch.testing.assert_close(tk[:k], torch.full((k,), 1 / k, dtype=torch.float64), atol=tol, rtol=0)


# faithful 2
def test_bernoulli_reweighting_is_unbiased():
    X = gauss(60, 4, 3) * torch.linspace(0.1, 3, 60, dtype=torch.float64)[:, None]
    q = row_scores(X, "leverage")
    C = X.T @ X

    def rel_err(trials: int) -> float:
        acc = torch.zeros_like(C)
        for s in range(trials):
            Xt, _, _ = sample_rows(X, 12, q, seed=s)
            acc += Xt.T @ Xt
        return float((acc / trials - C).norm() / C.norm())

    few, many = rel_err(20), rel_err(3000)
    assert many < 0.05 and many < few / 3


# faithful 3
def test_leverage_sampling_is_a_spectral_approximation_uniform_is_not():
    X = outliers()
    d = X.shape[1]
    m = int(40 * d * math.log(d))
    for kind, bound in (("leverage", lambda e: e < 0.35), ("uniform", lambda e: e > 0.9)):
        q = row_scores(X, kind)
        errs = [spectral_error(X, sample_rows(X, m, q, seed=s)[0]) for s in range(5)]
        assert all(bound(e) for e in errs), (kind, errs)
    # the i.i.d. fixed-size variant also gives a spectral approximation
    Xt, idx, _ = sample_rows(X, m, row_scores(X, "leverage"), seed=0, fixed_size=True)
    assert len(idx) == m and spectral_error(X, Xt) < 0.35


# faithful 4
def test_root_leverage_dominates_l1_sensitivity():
    pytest.importorskip("scipy")
    for seed in range(3):
        A = gauss(25, 4, seed) * torch.exp(gauss(25, 1, seed + 10))  # rows of varied scale
        s = row_scores(A, "l1_sensitivity")
        root = row_scores(A, "root_leverage", p=1)
        assert (s > 0).all() and (s <= root + 1e-7).all()
        assert float(s.sum()) <= A.shape[1] * math.sqrt(A.shape[0])  # total sensitivity ≤ Σ√τ ≤ √(N d)
    # a row alone spanning a direction has ℓ1 sensitivity 1
    A = torch.cat([gauss(10, 3, 7), torch.zeros(10, 1, dtype=torch.float64)], 1)
    A = torch.cat([A, torch.tensor([[0.0, 0, 0, 2.0]], dtype=torch.float64)])
    assert abs(float(row_scores(A, "l1_sensitivity")[-1]) - 1) < 1e-7


# faithful 5
@pytest.mark.parametrize("p", [2, 1])
def test_kept_rows_scaled_by_inverse_probability_root(p):
    X = gauss(200, 5, 4)
    q = row_scores(X, "root_leverage", p=p)
    q[:3] = 1e6  # certainly kept: p_i = 1
    Xt, idx, prob = sample_rows(X, 30, q, seed=1, p=p)
    expect = (30 * q / q.sum()).clamp(max=1)
    torch.testing.assert_close(prob, expect[idx], rtol=0, atol=0)
    torch.testing.assert_close(Xt, X[idx] * prob[:, None] ** (-1 / p), rtol=1e-15, atol=0)
    assert set(range(3)) <= set(idx.tolist()) and torch.equal(Xt[:3], X[:3])  # p_i = 1: unscaled
    Xf, idx_f, prob_f = sample_rows(X, 30, q, seed=1, p=p, fixed_size=True)
    torch.testing.assert_close(prob_f, 30 * q[idx_f] / q.sum(), rtol=0, atol=0)
    torch.testing.assert_close(Xf, X[idx_f] * prob_f[:, None] ** (-1 / p), rtol=1e-15, atol=0)


def test_bad_input_is_named():
    with pytest.raises(SubspacesError, match="kind"):
        row_scores(gauss(4, 2), "lewis")
    with pytest.raises(SubspacesError, match="m="):
        sample_rows(gauss(4, 2), 0, torch.ones(4))
    with pytest.raises(SubspacesError, match="kind"):
        RowSampler(10, "root_leverage")


def tiny():
    return ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0).eval()


def batches(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 10), generator=g) for _ in range(n)]


def collect(model, layers, cal, sampler=None):
    out = {}
    _calibrate.run_sequential(model, dict(layers), cal, {"inputs"}, lambda n, m, s: out.__setitem__(n, s), sampler=sampler)
    return out


def test_streaming_sampler_matches_offline_leverage_and_is_unbiased():
    """Plain model (no blocks): τ equal the offline Cholesky leverage of all rows; C̃ and the mean are unbiased."""
    X = outliers(n=3000, d=6, seed=2)
    X[:, :-1] += (X[:, -1:] == 0).double()  # a nonzero mean (the outliers keep their own direction)
    X = X.float()
    lin = nn.Linear(6, 3)
    cal = [X[i:i + 500] for i in range(0, 3000, 500)]
    full = collect(lin, {"": lin}, cal)[""]
    acc, mean, kept = 0, 0, []
    for seed in range(40):
        s = collect(lin, {"": lin}, cal, RowSampler(120, "leverage", seed))[""]
        assert s.tokens == 3000
        acc, mean = acc + s.xxt, mean + s.x_sum
        kept.append(s.extra["sampling"]["kept"])
    C = full.xxt
    assert float((acc / 40 - C).norm() / C.norm()) < 0.05
    assert float((mean / 40 - full.x_sum).norm() / full.x_sum.norm()) < 0.15
    sampler = RowSampler(120, "leverage", 0)
    collect(lin, {"": lin}, cal, sampler)
    tau = row_scores(X, "leverage", delta=sampler.delta)
    expected = float((120 * tau / tau.sum()).clamp(max=1).sum())
    assert abs(sampler.report[""]["expected"] - expected) < 1e-6 * expected
    assert 60 < sum(kept) / len(kept) < 125


def test_compress_with_sampler_runs_and_large_m_is_exact():
    cal = batches()
    tokens = sum(b.numel() for b in cal)
    ref = ss.compress_(tiny(), "svd", ratio=0.3, calibration=cal)
    same = ss.compress_(tiny(), "svd", ratio=0.3, calibration=cal, sampler=RowSampler(m=tokens))
    assert [r["output_error"] for r in same["layers"]] == [r["output_error"] for r in ref["layers"]]
    small = ss.compress_(tiny(), "svd", ratio=0.3, calibration=cal, sampler=RowSampler(m=20))
    assert all(r["output_error"] is not None and math.isfinite(r["output_error"]) for r in small["layers"])
    # statistics themselves: identical with m ≥ tokens, a sampled subset with small m
    model = tiny()
    layers = ss.compress._core.target_linears(model, "all-linear", None)
    full = collect(model, layers, cal)
    exact = collect(model, layers, cal, RowSampler(m=tokens))
    sampler = RowSampler(m=20)
    sub = collect(model, layers, cal, sampler)
    for n in layers:
        assert torch.equal(exact[n].xxt, full[n].xxt) and torch.equal(exact[n].x_sum, full[n].x_sum)
        assert sub[n].tokens == tokens and sampler.report[n]["kept"] < tokens
        assert not torch.equal(sub[n].xxt, full[n].xxt)


def test_sampling_error_reports_leverage_vs_uniform():
    model = tiny()
    rows = sampling_error(model, "all-linear", batches(), m=40)
    kinds = {r["kind"] for r in rows}
    assert kinds == {"leverage", "uniform"} and len(rows) == 2 * 14
    for r in rows:
        assert r["spectral_error"] >= 0 and 0 <= r["frobenius_error"] < 10 and r["tokens"] == 60
    exact = sampling_error(model, "all-linear", batches(), m=60, kinds=("leverage",))
    assert all(r["spectral_error"] < 1e-9 and r["frobenius_error"] == 0 for r in exact)
