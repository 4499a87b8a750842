"""ASVD (activation-aware SVD): exactness, alpha=0 is plain SVD, scaling helps on skewed channels, end to end."""
from __future__ import annotations

import pytest
import torch
from test_svd_llm import batches, inputs, linear, mean_error, out_err, stats_of, tiny

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces._registry import COMPRESS
from subspaces.compress import ASVD, SVD
from subspaces.nn import LowRankLinear


def test_registered_partial_with_note():
    entry = COMPRESS.get("asvd")
    assert entry.obj is ASVD and entry.status == "partial" and "2312.05821" in entry.paper
    assert "rank search" in entry.note
    assert ASVD().alpha == 0.5 and ASVD().svd == "exact"  # the official defaults (alpha 0.5, exact SVD ours)


def test_full_rank_reproduces_layer():
    layer, X = linear(), inputs()
    new = ASVD().compress(layer, 10, stats_of(X))
    assert isinstance(new, LowRankLinear) and new.rank == 10
    torch.testing.assert_close(new.weight, layer.weight, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(new(X), layer(X), rtol=1e-9, atol=1e-9)


def test_scale_is_channel_mean_abs_to_the_alpha():
    X = inputs()
    for alpha in (0.0, 0.5, 1.0):
        expect = X.abs().mean(0) ** alpha
        torch.testing.assert_close(ASVD(alpha=alpha).scale(stats_of(X)), expect)


def test_alpha_zero_equals_plain_svd():
    layer, X = linear(), inputs()
    for r in (1, 4, 9):
        torch.testing.assert_close(ASVD(alpha=0).compress(layer, r, stats_of(X)).weight,
                                   SVD().compress(layer, r, None).weight, rtol=1e-5, atol=1e-6)  # SVD: fp32


def test_scaling_reduces_output_error_on_skewed_channels():
    layer, X = linear(), inputs()  # channel scales exp(1.5·N(0,1)): up to ~100x apart
    for r in (2, 4, 6):
        asvd = out_err(layer, ASVD().compress(layer, r, stats_of(X)), X)
        svd = out_err(layer, SVD().compress(layer, r, None), X)
        assert asvd < 0.7 * svd


def test_dead_channel_is_finite():
    layer, X = linear(), inputs()
    X[:, 3] = 0.0
    new = ASVD(alpha=1.0).compress(layer, 3, stats_of(X))
    assert torch.isfinite(new.weight).all()
    assert float(new.weight.detach().abs().max()) < 1e3 * float(layer.weight.detach().abs().max())


def test_config_validation():
    with pytest.raises(SubspacesError, match="alpha"):
        ASVD(alpha=-0.5)
    with pytest.raises(SubspacesError, match="svd"):
        ASVD(svd="qr")
    with pytest.raises(SubspacesError, match="calibration"):
        ASVD().compress(linear(), 2, None)
    with pytest.raises(SubspacesError, match="rank"):
        ASVD().compress(linear(), 0, stats_of(inputs()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_end_to_end_beats_svd(dtype):
    data = batches()
    m = tiny(dtype)
    rep = ss.compress.compress_(m, "asvd", ratio=0.3, calibration=data, alpha=0.5)
    base = ss.compress.compress_(tiny(dtype), "svd", ratio=0.3, calibration=data)
    llm = ss.compress.compress_(tiny(dtype), "svd_llm", ratio=0.3, calibration=data)
    assert rep["method"] == "asvd" and rep["ratio"] >= 0.3
    assert mean_error(llm) < mean_error(rep) < 0.7 * mean_error(base)
    lrl = [mod for mod in m.modules() if isinstance(mod, LowRankLinear)]
    assert len(lrl) == 14 and all(mod.up.weight.dtype == dtype for mod in lrl)
    with torch.no_grad():
        assert torch.isfinite(m(data[0]).logits).all()


def test_end_to_end_unskewed_model_not_worse_than_svd():
    data = batches()
    rep = ss.compress.compress_(tiny(skew=False), "asvd", ratio=0.3, calibration=data)
    base = ss.compress.compress_(tiny(skew=False), "svd", ratio=0.3, calibration=data)
    assert mean_error(rep) < mean_error(base)
