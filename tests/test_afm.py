"""AFM (arXiv 2405.18146): the faithful tests of methods/compress-afm-ctr.md, plus an end-to-end run on a tiny LLaMA."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.compress._calibrate import LayerStats
from subspaces.compress._core import errors
from subspaces.compress.afm import AFM, afm_embedding
from subspaces.nn import LowRankLinear

F64 = torch.float64


def _layer(d_out: int, d_in: int, seed: int = 0, dtype=F64) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out).to(dtype)


def _inputs(n: int, d_in: int, seed: int = 1) -> torch.Tensor:
    """Anisotropic inputs with a nonzero mean, so the output covariance has a clear spectrum and μ matters."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, d_in, dtype=F64)
    return torch.randn(n, d_in, generator=g, dtype=F64) * scale + torch.randn(d_in, generator=g, dtype=F64)


def _stats(layer: nn.Linear, *xs: torch.Tensor) -> LayerStats:
    s = LayerStats()
    with torch.no_grad():
        for x in xs:
            s.add_inputs(x)
            s.add_outputs(layer(x))
    return s


@pytest.mark.parametrize("d_out,d_in", [(8, 12), (16, 6)])
def test_full_rank_is_exact(d_out, d_in):
    """Faithful 1: k = d gives W₂(W₁x + b₁) + b₂ == W x + b for every x, not only the calibration inputs."""
    layer = _layer(d_out, d_in)
    new = AFM().compress(layer, d_out, _stats(layer, _inputs(40, d_in)))
    x = torch.randn(25, d_in, dtype=F64) * 10
    with torch.no_grad():
        torch.testing.assert_close(new(x), layer(x), atol=1e-10, rtol=1e-10)


def test_folded_bias_equals_the_papers_two_layers():
    """The paper's two Linears (b₁ = U_kᵀ b, b₂ = (I − U_kU_kᵀ)μ) compose to our one LowRankLinear."""
    layer, x = _layer(10, 14), _inputs(300, 14)
    stats = _stats(layer, x)
    new = AFM().compress(layer, 4, stats)
    U, W, b, mu = new.up.weight, layer.weight, layer.bias, stats.output_mean()
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(new.down.weight, U.T @ W)
    with torch.no_grad():
        two = (x @ (U.T @ W).T + U.T @ b) @ U.T + (torch.eye(10, dtype=F64) - U @ U.T) @ mu
        torch.testing.assert_close(new(x), two, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_pca_optimality(k):
    """Faithful 2: the mean squared output error on the calibration set is Σ_{i>k} λ_i, the core's relative output
    error reports exactly that, and it is no larger than plain SVD's."""
    layer, x = _layer(10, 14), _inputs(500, 14)
    stats = _stats(layer, x)
    new = AFM().compress(layer, k, stats)
    with torch.no_grad():
        y, y2 = layer(x), new(x)
    lam = torch.linalg.eigvalsh(torch.cov(y.T, correction=0)).flip(0)  # independent of LayerStats
    discarded = float(lam[k:].sum())
    mse = float((y - y2).square().sum(1).mean())
    assert mse == pytest.approx(discarded, rel=1e-8, abs=1e-12)
    _, oerr = errors(layer, new, stats)
    assert oerr**2 * float(y.square().sum(1).mean()) == pytest.approx(discarded, rel=1e-6)
    _, svd_err = errors(layer, LowRankLinear.from_linear(layer, k), stats)
    assert oerr < svd_err


@pytest.mark.parametrize("k", [1, 4, 6])
def test_constant_outputs_give_the_mean(k):
    """Faithful 3: b₂ = (I − U_kU_kᵀ)μ; with constant outputs (Cov = 0) the compressed layer outputs μ for any k."""
    layer = _layer(6, 5)
    with torch.no_grad():
        layer.weight.zero_()                              # outputs are the bias whatever the inputs
    x = _inputs(30, 5)
    stats = _stats(layer, x)
    new = AFM().compress(layer, k, stats)
    with torch.no_grad():
        torch.testing.assert_close(new(torch.randn(9, 5, dtype=F64)), layer.bias.expand(9, 6), atol=1e-12, rtol=0)
    # a general layer fed one repeated input: constant outputs again, and the compressed layer gives back μ there
    layer = _layer(6, 5, seed=3)
    x0 = _inputs(1, 5).expand(20, 5)
    stats = _stats(layer, x0)
    new = AFM().compress(layer, k, stats)
    Uk, mu = new.up.weight, stats.output_mean()
    torch.testing.assert_close(new.up.bias - Uk @ (Uk.T @ layer.bias), mu - Uk @ (Uk.T @ mu))  # b₂ = (I − UUᵀ)μ
    with torch.no_grad():
        torch.testing.assert_close(new(x0), stats.output_mean().expand(20, 6), atol=1e-10, rtol=0)


def _principal_projection(E: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of E projected onto the top-k principal affine subspace of the w-weighted rows (via an SVD)."""
    mu = w @ E
    _, _, Vh = torch.linalg.svd(w.sqrt()[:, None] * (E - mu), full_matrices=False)
    P = Vh[:k].T @ Vh[:k]
    return mu + (E - mu) @ P


def test_embedding_is_the_principal_affine_projection():
    """Faithful 4: U_k e'_v + μ is the projection of e_v onto the top-k principal affine subspace, for every id."""
    g = torch.Generator().manual_seed(0)
    V, d, k = 30, 8, 3
    E = torch.randn(V, d, generator=g, dtype=F64) * torch.linspace(3, 0.2, d, dtype=F64) + 1.5
    ids = torch.randint(0, V, (4, 50), generator=g) % 20           # ids 20.. never looked up: weight 0
    counts = torch.bincount(ids.flatten(), minlength=V).to(F64)
    expected = _principal_projection(E, counts / counts.sum(), k)

    table, up, mu = afm_embedding(E, counts, k)
    assert table.shape == (V, k) and up.shape == (d, k) and mu.shape == (d,)
    torch.testing.assert_close(table @ up.T + mu, expected, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(mu, counts @ E / counts.sum())

    stats = LayerStats()                                          # looked-up outputs, collected in two batches
    stats.add_outputs(E[ids[:1]])
    stats.add_outputs(E[ids[1:]])
    stats.tokens = ids.numel()
    table2, up2, mu2 = afm_embedding(E, stats, k)
    torch.testing.assert_close(table2 @ up2.T + mu2, expected, atol=1e-10, rtol=1e-10)

    table3, up3, mu3 = afm_embedding(E.float(), None, k)          # every row once; dtype follows the table
    assert table3.dtype == torch.float32
    torch.testing.assert_close(table3 @ up3.T + mu3, _principal_projection(E, torch.full((V,), 1 / V, dtype=F64),
                                                                           k).float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(afm_embedding(E, None, d)[0] @ afm_embedding(E, None, d)[1].T + E.mean(0), E)


class _Spy(AFM):
    seen: list = []

    def compress(self, layer, rank, stats):
        _Spy.seen.append(stats)
        return super().compress(layer, rank, stats)


def test_moments_accumulate_over_batches():
    """Faithful 5: through compress_ with three uneven mini-batches, the moments and the compressed layer equal
    single-pass statistics computed by hand (the demo code overwrote its sums per batch)."""
    layer = _layer(9, 6, seed=2)
    model = nn.Sequential(copy.deepcopy(layer))
    g = torch.Generator().manual_seed(5)
    batches = [torch.randn(*s, 6, generator=g, dtype=F64) + i for i, s in enumerate([(3, 5), (1, 2), (4, 7)])]
    _Spy.seen.clear()
    ss.compress.compress_(model, _Spy(), rank=3, targets=["0"], calibration=batches)
    (stats,) = _Spy.seen

    with torch.no_grad():
        Y = layer(torch.cat([b.reshape(-1, 6) for b in batches]))
    mu = Y.mean(0)
    cov = (Y - mu).T @ (Y - mu) / Y.shape[0]
    assert stats.tokens == Y.shape[0] == 45
    torch.testing.assert_close(stats.output_mean(), mu, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(stats.output_cov(), cov, atol=1e-10, rtol=1e-10)

    U = torch.linalg.eigh(cov).eigenvectors.flip(1)[:, :3]
    P = U @ U.T
    new = model[0]
    assert isinstance(new, LowRankLinear)
    torch.testing.assert_close(new.up.weight @ new.up.weight.T, P, atol=1e-10, rtol=0)
    torch.testing.assert_close(new.weight, P @ layer.weight, atol=1e-10, rtol=0)
    torch.testing.assert_close(new.up.bias, P @ layer.bias + mu - P @ mu, atol=1e-10, rtol=0)
    # the last batch alone (the demo's bug) gives another mean: the check above can tell them apart
    with torch.no_grad():
        assert not torch.allclose(layer(batches[-1]).reshape(-1, 9).mean(0), mu, atol=1e-3)


def _llama():
    return ss.models.tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2)


def _calibration():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (2, 24), generator=g) for _ in range(3)]


def test_tiny_llama_end_to_end_beats_svd_on_output_error(tmp_path):
    """compress_(model, "afm", ratio=0.3) runs; per layer its reported output error is no larger than plain SVD's
    (PCA of the outputs is the optimal rank-k affine map for output MSE on the calibration set)."""
    base, calib = _llama().eval(), _calibration()
    afm_model, svd_model = copy.deepcopy(base), copy.deepcopy(base)
    rep_afm = ss.compress.compress_(afm_model, "afm", ratio=0.3, calibration=calib)
    rep_svd = ss.compress.compress_(svd_model, "svd", ratio=0.3, calibration=calib)
    assert rep_afm["method"] == "afm" and len(rep_afm["layers"]) == 14
    for a, s in zip(rep_afm["layers"], rep_svd["layers"]):
        assert a["name"] == s["name"] and a["rank"] == s["rank"] is not None
        assert a["output_error"] <= s["output_error"] + 1e-9, a["name"]
    # a LLaMA Linear has no bias: AFM adds one per layer for the mean correction
    assert rep_afm["params_after"] == rep_svd["params_after"] + sum(a["shape"][0] for a in rep_afm["layers"])
    with torch.no_grad():
        ref, out = base(calib[0]).logits, afm_model(calib[0]).logits
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert any(isinstance(m, LowRankLinear) for m in afm_model.modules())
    ss.compress.save_compressed(afm_model, tmp_path / "afm", report=rep_afm)  # the added biases round-trip
    with torch.no_grad():
        torch.testing.assert_close(ss.compress.load_compressed(tmp_path / "afm")(calib[0]).logits, out)


def test_tiny_llama_same_inputs_afm_beats_svd_everywhere():
    """On the very statistics AFM compressed with (later blocks see compressed earlier ones), SVD at the same rank
    is never better: the comparison is exact for every layer, not only the first block's."""
    model, calib = _llama().eval(), _calibration()
    _Spy.seen.clear()
    ranks = []

    class Ranked(_Spy):
        def compress(self, layer, rank, stats):
            new = super().compress(layer, rank, stats)
            ranks.append((layer, new, rank))
            return new

    ss.compress.compress_(model, Ranked(), ratio=0.3, calibration=calib)
    assert len(ranks) == 14
    for (layer, new, r), stats in zip(ranks, _Spy.seen):
        afm_err = errors(layer, new, stats)[1]
        svd_err = errors(layer, LowRankLinear.from_linear(layer, r), stats)[1]
        assert afm_err <= svd_err + 1e-9


def test_bf16_layer_and_bad_input():
    layer = _layer(8, 6, dtype=torch.bfloat16)
    x = _inputs(50, 6).to(torch.bfloat16)
    new = AFM().compress(layer, 3, _stats(layer, x))
    assert new.down.weight.dtype == new.up.bias.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(new(x)).all()
    with pytest.raises(SubspacesError, match="rank=9"):
        AFM().compress(layer, 9, _stats(layer, x))
    with pytest.raises(SubspacesError, match="calibration"):
        AFM().compress(layer, 3, None)
    with pytest.raises(SubspacesError, match="calibration"):
        ss.compress.compress_(nn.Sequential(nn.Linear(4, 4)), "afm", rank=2, targets=["0"])
    with pytest.raises(SubspacesError, match="counts"):
        afm_embedding(torch.randn(5, 3), torch.ones(4), 2)
