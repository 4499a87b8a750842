"""SALT faithful tests (methods/adapter-salt.md): identity at init, count 2r + 2(k-r)r_lora, top-block scaling, tail
update rank, the Conv2d path and the L_reg regularizer."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ids, llama_causal, logits, with_spectrum
from torch import nn

import subspaces as ss
from subspaces.adapters import SALT
from subspaces.adapters._core import adapted_layers


def one_layer(layer: nn.Module, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.layer = layer
    ss.adapt_(m, "salt", targets=["layer"], **kw)
    return m


def rand_xy(d, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        d.X.copy_(torch.randn(d.X.shape, generator=g) * std)
        d.Y.copy_(torch.randn(d.Y.shape, generator=g) * std)


def rand_all(d, seed: int = 0) -> None:
    rand_xy(d, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        d.scale.copy_(1 + torch.randn(d.scale.shape, generator=g) * 0.5)
        d.shift.copy_(torch.randn(d.shift.shape, generator=g) * 0.3)


def official_weight(d) -> torch.Tensor:
    """The official layer's W' = U ReLU(Σ') Vᵀ, written out independently of SALTDelta.core()."""
    r = d.r
    sig = torch.diag(d.sigma.clone())
    sig[:r, :r] = torch.diag(d.scale * d.sigma[:r] + d.shift)
    sig[r:, r:] += d.X @ d.Y
    return d.U @ F.relu(sig) @ d.Vh


# 1. identity at init ------------------------------------------------------------------------------------------

def test_identity_at_init_and_init_values():
    base = llama_causal()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "salt", targets="all-linear")  # official defaults: ratio 0.1, lora_rank 256
    assert torch.equal(logits(m, x), logits(base, x))
    for _, layer in adapted_layers(m):
        d, W0 = layer.delta, layer.weight
        torch.testing.assert_close((d.U * d.sigma) @ d.Vh, W0, atol=1e-5, rtol=0)
        torch.testing.assert_close(official_weight(d), W0, atol=1e-4, rtol=0)
        assert torch.equal(d.scale, torch.ones_like(d.scale)) and not d.shift.any() and not d.Y.any()
        bound = math.sqrt(6 / 256)  # kaiming_uniform(fan_in=r_lora, gain=√2)
        assert d.X.abs().max() <= bound and d.X.abs().max() > 0.8 * bound
    rand_xy(adapted_layers(m)[0][1].delta)
    assert not torch.allclose(logits(m, x), logits(base, x))


# 2. trainable count 2r + 2(k - r) r_lora; U, Σ, V, W0 get no gradient ---------------------------------------

@pytest.mark.parametrize("layer,kw,r,t", [
    (nn.Linear(20, 12), dict(ratio=0.3, lora_rank=2), 3, 9),       # k = 12, r = ⌊3.6⌋
    (nn.Linear(20, 12), dict(rank=5, lora_rank=4), 5, 7),
    (nn.Conv2d(3, 8, 3), dict(lora_rank=3), 1, 7),                  # k = min(8, 27), r = max(1, ⌊0.8⌋)
])
def test_trainable_count_and_frozen_factors(layer, kw, r, t):
    m = one_layer(layer, **kw)
    d = layer.delta
    n = 2 * r + 2 * t * kw["lora_rank"]
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == n == SALT(**kw).num_trainable(layer)
    assert (d.scale.numel(), d.X.shape) == (r, (t, kw["lora_rank"]))
    rand_xy(d)
    x = torch.randn(2, 3, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(4, 20)
    layer(x).pow(2).sum().backward()
    assert all(p.grad is not None for p in d.parameters())
    assert layer.weight.grad is None and not any(b.requires_grad for b in d.buffers())


# 3. a_i = 2 scales exactly the i-th singular value --------------------------------------------------------------

def test_scale_acts_on_one_singular_value():
    S = [6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.2, 1.1, 1.0]
    lin = with_spectrum(S)
    one_layer(lin, rank=3, lora_rank=2)
    with torch.no_grad():
        lin.delta.scale[1] = 2.0
        W = lin.weight + lin.delta.weight()
    expected = torch.tensor(S)
    expected[1] = 10.0
    torch.testing.assert_close(torch.linalg.svdvals(W), expected.sort(descending=True).values, atol=1e-4, rtol=0)


# 4. the tail update lives in the tail block and has rank <= r_lora (relu_mode="diag") ---------------------------

def test_tail_update_rank():
    S = [6.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.2, 1.1, 1.0]
    lin = with_spectrum(S)
    one_layer(lin, rank=3, lora_rank=2, relu_mode="diag")
    d = lin.delta
    rand_xy(d, std=0.2)  # |diag(XY)| < 1 <= tail σ: every diagonal entry stays positive
    with torch.no_grad():
        C = d.U.T @ d.weight() @ d.Vh.T
        XY = d.X @ d.Y
    assert C[:3].abs().max() < 1e-5 and C[:, :3].abs().max() < 1e-5
    torch.testing.assert_close(C[3:, 3:], XY, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(C[3:, 3:], atol=1e-4) == 2
    # relu_mode="full" (official): ReLU on every entry of Σ', so U ReLU(Σ') Vᵀ has no negative coordinate and the
    # tail update is no longer low-rank
    lin2 = with_spectrum(S)
    one_layer(lin2, rank=3, lora_rank=2)
    rand_xy(lin2.delta, std=0.2)
    with torch.no_grad():
        full = d.U.T @ (lin2.weight + lin2.delta.weight()) @ d.Vh.T
        assert (XY < -1e-3).any() and full.min() > -1e-5
        assert torch.linalg.matrix_rank(full[3:, 3:] - torch.diag(torch.tensor(S[3:])), atol=1e-4) > 2
        torch.testing.assert_close(lin2.weight + lin2.delta.weight(), official_weight(lin2.delta), atol=1e-5, rtol=0)


def test_linear_forward_matches_official_layer():
    from transformers.pytorch_utils import Conv1D

    for layer in (nn.Linear(14, 10), Conv1D(10, 14)):
        m = one_layer(layer, ratio=0.3, lora_rank=3)
        rand_all(layer.delta)
        x = torch.randn(5, 14)
        with torch.no_grad():
            adapted = layer(x)
            W = official_weight(layer.delta)
            torch.testing.assert_close(adapted, x @ W.T + layer.bias, atol=1e-5, rtol=0)  # W is (d_out, d_in)
        ss.fold_(m)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=0)


# 5. Conv2d path ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [1, 2])
def test_conv2d_identity_and_fold(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=groups)
    ref = copy.deepcopy(conv)
    m = one_layer(conv, ratio=0.25, lora_rank=2)
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        assert torch.equal(conv(x), ref(x))
    rand_all(conv.delta)
    with torch.no_grad():
        adapted = conv(x)
        W = official_weight(conv.delta).view(conv.weight.shape)
        torch.testing.assert_close(adapted, F.conv2d(x, W, conv.bias, 2, 1, 1, groups), atol=1e-5, rtol=0)
    assert (adapted - ref(x)).abs().max() > 1e-2
    ss.fold_(m)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), adapted, atol=1e-5, rtol=0)


# 6. L_reg: 0 at init, differentiable; the method's penalty ---------------------------------------------------

def test_regularizer():
    m = one_layer(nn.Linear(20, 12), ratio=0.25, lora_rank=2)
    d = m.layer.delta
    assert d.reg_loss().item() == 0.0
    ss.adapters.penalty(m).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in d.parameters())
    rand_xy(d)
    with torch.no_grad():
        d.scale.mul_(1.5)
        d.shift.add_(0.1)
    d.zero_grad()
    top = d.sigma[:3]
    expected = torch.linalg.norm(d.scale * top + d.shift - top) + torch.linalg.norm(d.X @ d.Y)
    torch.testing.assert_close(d.reg_loss(), expected)
    pen = ss.adapters.penalty(m)
    torch.testing.assert_close(pen, 0.01 * expected)
    pen.backward()
    assert all(p.grad.abs().sum() > 0 for p in d.parameters())
    m0 = one_layer(nn.Linear(20, 12), reg_multiplier=0.0)
    assert ss.adapters.penalty(m0) == 0.0


def test_config_validation():
    for bad in [dict(ratio=0.0), dict(ratio=1.5), dict(rank=0), dict(lora_rank=0), dict(relu_mode="x"),
                dict(reg_multiplier=-1.0)]:
        with pytest.raises(ss.SubspacesError, match="salt"):
            SALT(**bad)
    with pytest.raises(ss.SubspacesError, match="rank=13"):
        one_layer(nn.Linear(20, 12), rank=13)
    with pytest.raises(ss.SubspacesError, match="Embedding"):
        one_layer(nn.Embedding(10, 4))
