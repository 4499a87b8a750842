"""FWSVD (Hsu et al., ICLR 2022): the faithful tests of methods/compress-fwsvd.md and an end-to-end run."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.compress import _calibrate
from subspaces.compress._calibrate import LayerStats
from subspaces.compress.fwsvd import FWSVD, fisher_svd
from subspaces.linalg import truncated_svd
from subspaces.nn import LowRankLinear

F64 = torch.float64


def spectrum_matrix(out: int, inp: int, s: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out, len(s), generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(inp, len(s), generator=g, dtype=F64)).Q
    return U @ torch.diag(torch.tensor(s, dtype=F64)) @ V.T


def weighted(W: torch.Tensor, d: torch.Tensor, axis: str) -> torch.Tensor:
    return W * d if axis == "in" else d[:, None] * W


def stats_with(fisher_in: torch.Tensor, fisher_out: torch.Tensor) -> LayerStats:
    return LayerStats(fisher_in=fisher_in.to(F64), fisher_out=fisher_out.to(F64), batches=1)


def linear(W: torch.Tensor, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(W.shape[1], W.shape[0], bias=bias, dtype=W.dtype)
    with torch.no_grad():
        layer.weight.copy_(W)
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("axis", ["in", "out"])
def test_uniform_fisher_is_truncated_svd(axis):
    """Test 1: Î ∝ I gives the rank-r truncated SVD of W (function and config)."""
    torch.manual_seed(0)
    W = torch.randn(7, 9, dtype=F64)
    U, S, Vh = truncated_svd(W, 3)
    best = U @ torch.diag(S) @ Vh
    n = 9 if axis == "in" else 7
    up, down = fisher_svd(W, torch.full((n,), 2.5, dtype=F64), 3, axis=axis)
    torch.testing.assert_close(up @ down, best)
    layer = linear(W)
    new = FWSVD(row_axis=axis).compress(layer, 3, stats_with(torch.full((9,), 0.3), torch.full((7,), 0.7)))
    assert isinstance(new, LowRankLinear) and new.rank == 3
    torch.testing.assert_close(new.weight, best)
    # LowRankLinear.from_linear factors in float32.
    torch.testing.assert_close(new.weight, LowRankLinear.from_linear(layer, 3).weight.to(F64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new.up.bias, layer.bias)


@pytest.mark.parametrize("axis", ["in", "out"])
def test_optimal_weighted_error(axis):
    """Test 2: ‖Î(W − AB)‖ equals the tail of the spectrum of ÎW and beats plain SVD and other rank-r pairs."""
    torch.manual_seed(1)
    W = torch.randn(10, 12, dtype=F64)
    d = torch.rand(12 if axis == "in" else 10, dtype=F64) * 3 + 0.1
    r = 4
    up, down = fisher_svd(W, d, r, axis=axis)
    assert up.shape == (10, r) and down.shape == (r, 12)
    err = weighted(W - up @ down, d, axis).norm()
    s = torch.linalg.svdvals(weighted(W, d, axis))
    torch.testing.assert_close(err, s[r:].square().sum().sqrt())
    U, S, Vh = truncated_svd(W, r)
    plain = weighted(W - U @ torch.diag(S) @ Vh, d, axis).norm()
    assert err < plain
    for _ in range(20):
        B, A = torch.randn(10, r, dtype=F64), torch.randn(r, 12, dtype=F64)
        assert err <= weighted(W - B @ A, d, axis).norm()
        # Small perturbations of the optimum never improve it.
        B2, A2 = up + 1e-3 * B, down + 1e-3 * A
        assert err <= weighted(W - B2 @ A2, d, axis).norm() + 1e-12


@pytest.mark.parametrize("axis", ["in", "out"])
def test_full_rank_is_exact(axis):
    """Test 3: at r = min(N, M) the factorization reproduces W (Î invertible)."""
    torch.manual_seed(2)
    W = torch.randn(6, 9, dtype=F64)
    d = torch.rand(9 if axis == "in" else 6, dtype=F64) + 1e-3
    up, down = fisher_svd(W, d, 6, axis=axis)
    torch.testing.assert_close(up @ down, W)
    new = FWSVD(row_axis=axis).compress(linear(W), 6, stats_with(torch.rand(9), torch.rand(6)))
    torch.testing.assert_close(new.weight, W)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_fisher_accumulation_matches_analytic(batch_size):
    """Test 4: for L = ½‖W x − y‖² per batch, ∂L/∂W = Σ_n r_n x_nᵀ (r = W x − y); the accumulated row sums equal
    the mean over batches of the squared gradient summed along the other axis."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4, bias=False, dtype=F64))
    W = model[0].weight.detach().clone()
    data = [(torch.randn(batch_size, 5, dtype=F64), torch.randn(batch_size, 4, dtype=F64)) for _ in range(4)]

    def loss_fn(m, batch):
        x, y = batch
        return 0.5 * (m(x) - y).square().sum()

    stats = _calibrate.fisher(model, {"0": model[0]}, data, loss_fn)["0"]
    G2 = torch.zeros(4, 5, dtype=F64)
    for x, y in data:
        G2 += ((x @ W.T - y).T @ x).square()
    G2 /= len(data)
    torch.testing.assert_close(stats.fisher("in"), G2.sum(0))
    torch.testing.assert_close(stats.fisher("out"), G2.sum(1))
    assert model[0].weight.requires_grad  # the model's flags are restored
    # The config weighs with √(Î + ε) along the chosen axis.
    cfg = FWSVD(eps=1e-3)
    up, down = fisher_svd(W, (G2.sum(0) + 1e-3).sqrt(), 2, axis="in")
    torch.testing.assert_close(cfg.compress(model[0], 2, stats).weight, up @ down)


def elementwise_optimum(W: torch.Tensor, omega: torch.Tensor, rank: int, iters: int = 500) -> torch.Tensor:
    """argmin Σ_ij Ω_ij (W − B A)_ij² by alternating weighted least squares from a random start."""
    g = torch.Generator().manual_seed(0)
    A = torch.randn(rank, W.shape[1], generator=g, dtype=F64)
    for _ in range(iters):
        # Row i of B: (A diag(Ω_i) Aᵀ) b_i = A diag(Ω_i) w_i; column j of A likewise.
        B = torch.linalg.solve(torch.einsum("rj,ij,sj->irs", A, omega, A), torch.einsum("rj,ij,ij->ir", A, omega, W))
        A = torch.linalg.solve(torch.einsum("ir,ij,is->jrs", B, omega, B), torch.einsum("ir,ij,ij->jr", B, omega, W)).T
    return B @ A


@pytest.mark.parametrize("axis", ["in", "out"])
def test_orientation_matches_elementwise_optimum(axis):
    """Test 5: a Fisher constant along the other axis (F_ij = c_j for "in", a_i for "out"): the chosen row_axis
    gives the exact element-wise weighted optimum; the other axis only sees uniform sums (plain SVD) and is worse."""
    out, inp, r = 6, 8, 2
    W = spectrum_matrix(out, inp, [10.0, 7.0, 2.0, 1.0, 0.5, 0.2], seed=4)
    g = torch.Generator().manual_seed(5)
    c = torch.rand(inp if axis == "in" else out, generator=g, dtype=F64) * 4 + 0.2
    F = c.expand(out, inp) if axis == "in" else c[:, None].expand(out, inp)
    best = elementwise_optimum(W, F, r)
    stats = stats_with(F.sum(0), F.sum(1))
    layer = linear(W, bias=False)

    def werr(What):
        return (F * (W - What).square()).sum().sqrt()

    eps = 1e-12  # negligible next to the Fisher, so the config's objective is exactly Σ F_ij (·)²
    mine = FWSVD(row_axis=axis, eps=eps).compress(layer, r, stats).weight
    torch.testing.assert_close(mine, best, rtol=1e-7, atol=1e-7)
    other = FWSVD(row_axis="out" if axis == "in" else "in", eps=eps).compress(layer, r, stats).weight
    U, S, Vh = truncated_svd(W, r)
    torch.testing.assert_close(other, U @ torch.diag(S) @ Vh)
    assert werr(mine) < werr(other) * 0.999


def test_config_validation_and_dtype():
    with pytest.raises(SubspacesError, match="row_axis"):
        FWSVD(row_axis="rows")
    with pytest.raises(SubspacesError, match="eps"):
        FWSVD(eps=0.0)
    with pytest.raises(SubspacesError, match="svd"):
        FWSVD(svd="lanczos")
    with pytest.raises(SubspacesError, match="row_weights"):
        fisher_svd(torch.randn(3, 4), torch.ones(3), 2, axis="in")
    with pytest.raises(SubspacesError, match="Fisher"):
        FWSVD().compress(nn.Linear(4, 3), 2, None)
    assert ss.compress._core.COMPRESS.get("fwsvd").obj is FWSVD
    assert FWSVD.needs == frozenset({"fisher"})
    # bf16 layers are factored in float32 and come back in bf16 on the same device.
    layer = nn.Linear(8, 6).to(torch.bfloat16)
    new = FWSVD(svd="randomized").compress(layer, 3, stats_with(torch.rand(8), torch.rand(6)))
    assert new.down.weight.dtype == torch.bfloat16 and new.up.bias.dtype == torch.bfloat16
    # A layer the loss did not reach (no Fisher) gets plain SVD.
    layer = nn.Linear(8, 6, dtype=F64)
    U, S, Vh = truncated_svd(layer.weight.detach(), 3)
    torch.testing.assert_close(FWSVD().compress(layer, 3, LayerStats()).weight, U @ torch.diag(S) @ Vh)


def test_compress_tiny_llama_beats_svd_in_fisher_norm():
    """End to end: compress_ with calibration runs, and per layer FWSVD's Fisher-weighted error <= plain SVD's."""
    base = ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 256, (2, 12), generator=g) for _ in range(3)]
    layers = ss.compress._core.target_linears(base, "all-linear", None)
    weights = {n: m.weight.detach().to(F64).clone() for n, m in layers.items()}
    fisher = _calibrate.fisher(base, layers, data)
    fw, sv = copy.deepcopy(base), copy.deepcopy(base)
    rep = ss.compress.compress_(fw, "fwsvd", ratio=0.3, calibration=data)
    rep_svd = ss.compress.compress_(sv, "svd", ratio=0.3, calibration=data)
    assert rep["method"] == "fwsvd" and 0.25 < rep["ratio"] < 0.35
    assert [r["rank"] for r in rep["layers"]] == [r["rank"] for r in rep_svd["layers"]]
    strictly = 0
    for row in rep["layers"]:
        n = row["name"]
        assert isinstance(fw.get_submodule(n), LowRankLinear)
        d = (fisher[n].fisher("in") + 1e-5).sqrt()  # the default row_axis="in", eps=1e-5
        e_fw = ((weights[n] - fw.get_submodule(n).weight.to(F64)) * d).norm()
        e_sv = ((weights[n] - sv.get_submodule(n).weight.to(F64)) * d).norm()
        assert e_fw <= e_sv * (1 + 1e-5), n
        strictly += bool(e_fw < e_sv * 0.999)
    assert strictly >= len(rep["layers"]) // 2
    with torch.no_grad():
        assert torch.isfinite(fw(data[0]).logits).all()
