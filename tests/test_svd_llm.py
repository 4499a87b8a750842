"""SVD-LLM (truncation-aware whitening): exactness, the truncation-aware optimality, damping, end to end."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces._registry import COMPRESS
from subspaces.compress import ASVD, SVD, SVDLLM, LayerStats
from subspaces.compress.svd_llm import whitening
from subspaces.nn import LowRankLinear


def linear(out: int = 10, inp: int = 16, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(inp, out, bias=bias).double()


def inputs(tokens: int = 60, inp: int = 16, seed: int = 1) -> torch.Tensor:
    """(tokens, in): correlated features with very different scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64)
    scales = torch.exp(1.5 * torch.randn(inp, generator=g, dtype=torch.float64))
    return (torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix) * scales


def stats_of(X: torch.Tensor) -> LayerStats:
    s = LayerStats()
    s.add_inputs(X)
    return s


def out_err(layer: nn.Linear, new: nn.Module, X: torch.Tensor) -> float:
    """‖(W − W')X‖_F² over the tokens (biases cancel: both keep the same bias)."""
    return float((X @ (layer.weight - new.weight).detach().T.double()).square().sum())


def test_registered_complete():
    entry = COMPRESS.get("svd_llm")
    assert entry.obj is SVDLLM and entry.status == "complete" and "2403.07378" in entry.paper


def test_full_rank_reproduces_layer():
    layer, X = linear(), inputs()
    new = SVDLLM().compress(layer, 10, stats_of(X))
    assert isinstance(new, LowRankLinear) and new.rank == 10
    torch.testing.assert_close(new.weight, layer.weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new(X), layer(X), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new.up.bias, layer.bias)


def test_truncation_aware_error_equals_discarded_spectrum_and_beats_svd_and_asvd():
    layer, X = linear(), inputs()
    W = layer.weight.detach()
    sigma = torch.linalg.svdvals(W @ torch.linalg.cholesky(X.T @ X))
    for r in range(1, 10):
        new = SVDLLM().compress(layer, r, stats_of(X))
        err = out_err(layer, new, X)
        torch.testing.assert_close(err, float(sigma[r:].square().sum()), rtol=1e-8, atol=1e-10)
        for other in (SVD(), ASVD()):
            assert err <= out_err(layer, other.compress(layer, r, stats_of(X)), X) * (1 + 1e-9)
    assert out_err(layer, SVDLLM().compress(layer, 3, stats_of(X)), X) < \
        0.5 * out_err(layer, SVD().compress(layer, 3, stats_of(X)), X)


def test_isotropic_inputs_equal_plain_svd():
    layer = linear()
    st = LayerStats(tokens=7, xxt=7 * 2.5 * torch.eye(16, dtype=torch.float64),
                    x_sum=torch.zeros(16, dtype=torch.float64))
    for r in (1, 4, 9):
        torch.testing.assert_close(SVDLLM().compress(layer, r, st).weight,
                                   SVD().compress(layer, r, None).weight, rtol=1e-5, atol=1e-6)  # SVD: fp32


@pytest.mark.parametrize("case", ["few_tokens", "dead_feature"])
def test_damping_on_rank_deficient_moment(case):
    layer = linear()
    X = inputs(tokens=5) if case == "few_tokens" else inputs()
    if case == "dead_feature":
        X[:, 3] = 0.0
    C = X.T @ X / X.shape[0]
    assert int(torch.linalg.cholesky_ex(C).info) != 0  # the plain factorization fails: the damped path runs
    L = whitening(C, 1e-6)
    assert torch.isfinite(L).all() and float(L.diagonal().min()) > 0
    scale = float(C.diagonal().mean())
    assert float((L @ L.T - C).abs().max()) < 1e-4 * scale  # a small diagonal load, not a different matrix
    r = 3
    new = SVDLLM().compress(layer, r, stats_of(X))
    assert torch.isfinite(new.weight).all()
    assert out_err(layer, new, X) <= out_err(layer, SVD().compress(layer, r, None), X) * (1 + 1e-6)
    if case == "few_tokens":  # rank 5 captures the 5-token span exactly
        assert out_err(layer, SVDLLM().compress(layer, 5, stats_of(X)), X) < 1e-8 * float(X.square().sum())


def test_damping_grows_until_factorized():
    C = -torch.eye(4, dtype=torch.float64)  # not PSD: the eigenvalue shift makes it factorizable
    L = whitening(C, 1e-6)
    assert torch.isfinite(L).all()
    with pytest.raises(SubspacesError, match="inf/NaN"):
        whitening(torch.full((3, 3), float("nan"), dtype=torch.float64), 1e-6)


def test_config_validation():
    with pytest.raises(SubspacesError, match="damping"):
        SVDLLM(damping=0.0)
    with pytest.raises(SubspacesError, match="svd"):
        SVDLLM(svd="qr")
    with pytest.raises(SubspacesError, match="calibration"):
        SVDLLM().compress(linear(), 2, None)
    with pytest.raises(SubspacesError, match="rank"):
        SVDLLM().compress(linear(), 11, stats_of(inputs()))


def test_randomized_svd_close_to_exact():
    layer, X = linear(), inputs()
    a = out_err(layer, SVDLLM(svd="randomized").compress(layer, 4, stats_of(X)), X)
    b = out_err(layer, SVDLLM().compress(layer, 4, stats_of(X)), X)
    assert b <= a * (1 + 1e-9) and a <= 1.5 * b


def tiny(dtype: torch.dtype = torch.float32, skew: bool = True):
    """Tiny random LLaMA; ``skew`` gives the RMSNorm weights log-normal gains, so the Linears' input channels have
    strongly different scales (as the outlier channels of trained LLMs)."""
    m = ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0).eval()
    if skew:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n.endswith("layernorm.weight"):
                    p.copy_(torch.exp(1.5 * torch.randn(p.shape, generator=g)))
    return m.to(dtype)


def batches(n: int = 4, length: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, length), generator=g) for _ in range(n)]


def mean_error(report) -> float:
    errs = [row["output_error"] for row in report["layers"]]
    return sum(errs) / len(errs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("skew", [True, False])
def test_end_to_end_beats_svd(dtype, skew):
    data = batches()
    m = tiny(dtype, skew)
    rep = ss.compress.compress_(m, "svd_llm", ratio=0.3, calibration=data)
    base = ss.compress.compress_(tiny(dtype, skew), "svd", ratio=0.3, calibration=data)
    assert rep["method"] == "svd_llm" and rep["ratio"] >= 0.3
    assert mean_error(rep) < 0.9 * mean_error(base)
    lrl = [mod for mod in m.modules() if isinstance(mod, LowRankLinear)]
    assert len(lrl) == 14 and all(mod.down.weight.dtype == dtype for mod in lrl)
    with torch.no_grad():
        assert torch.isfinite(m(data[0]).logits).all()


def test_end_to_end_few_tokens_uses_damping():
    m, data = tiny(), [torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))]
    rep = ss.compress.compress_(m, "svd_llm", ratio=0.3, calibration=data)  # 8 tokens < 32 features
    assert all(row["output_error"] == row["output_error"] for row in rep["layers"])  # no NaN
    with torch.no_grad():
        assert torch.isfinite(m(batches(1)[0]).logits).all()
