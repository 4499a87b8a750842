"""FLoRA faithful tests (methods/adapter-flora.md) plus the fast path, init, dtype and linalg.tucker_product."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subspaces as ss
from subspaces.adapters import FLoRA
from subspaces.linalg import tucker_product


def one_layer(layer: nn.Module, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.layer = layer
    ss.adapt_(m, "flora", targets=["layer"], **kw)
    return m


def randomize(delta, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in delta.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


# 1. ΔW = 0 at init: adapted outputs equal the base bit for bit; the first gradient reaches only the core ---------

@pytest.mark.parametrize("init", ["kaiming_normal", "kaiming_uniform"])
@pytest.mark.parametrize("make,shape", [
    (lambda: nn.Linear(12, 7), (3, 12)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
], ids=["linear", "conv2d"])
def test_identity_at_init_and_first_gradient_on_core_only(make, shape, init):
    layer, x = make(), torch.randn(shape)
    ref = layer(x).detach()
    one_layer(layer, rank=3, kernel_rank=2, init=init)
    d = layer.delta
    assert torch.equal(d.G, torch.zeros_like(d.G)) and all(u.abs().sum() > 0 for u in d.U)
    assert torch.equal(d.weight(), torch.zeros_like(layer.weight))
    out = layer(x)
    assert torch.equal(out, ref)
    out.pow(2).sum().backward()
    assert d.G.grad.abs().sum() > 0
    assert all(torch.equal(u.grad, torch.zeros_like(u)) for u in d.U)
    randomize(d)
    assert not torch.allclose(layer(x), ref)  # the branch is live


def test_init_distributions():
    torch.manual_seed(0)
    d = one_layer(nn.Linear(300, 400), rank=64).layer.delta
    for u in d.U:  # kaiming_normal(a=√3) with fan-in r: std = √(2/(1+3)) / √r
        assert abs(u.std().item() - math.sqrt(0.5 / 64)) < 0.1 * math.sqrt(0.5 / 64)
    d = one_layer(nn.Linear(300, 400), rank=64, init="kaiming_uniform").layer.delta
    assert 0.9 / math.sqrt(300) < d.U[0].abs().max() <= 1 / math.sqrt(300)  # A = U_inᵀ: fan-in d_in
    assert 0.9 / math.sqrt(64) < d.U[1].abs().max() <= 1 / math.sqrt(64)  # B = U_out: fan-in r


# 2. shape / ordering: dims [C_in, C_out, k_h, k_w], PyTorch layout (C_out, C_in, k_h, k_w) ------------------------

def test_conv2d_weight_matches_einsum():
    conv = nn.Conv2d(3, 5, kernel_size=(3, 2))
    one_layer(conv, rank=2, kernel_rank=2, alpha=3.0)
    d = conv.delta
    randomize(d)
    G, (U_in, U_out, U_h, U_w) = d.G, list(d.U)
    assert G.shape == (2, 2, 2, 2) and U_in.shape == (3, 2) and U_out.shape == (5, 2)
    assert U_h.shape == (3, 2) and U_w.shape == (2, 2)
    expected = torch.einsum("abcd,ia,ob,hc,wd->oihw", G, U_in, U_out, U_h, U_w) * 1.5
    torch.testing.assert_close(d.weight(), expected, atol=1e-6, rtol=0)
    assert d.weight().shape == conv.weight.shape


# 3. parameter count Π r_n + Σ d_n r_n --------------------------------------------------------------------------

@pytest.mark.parametrize("layer,kw,dims,ranks", [
    (nn.Linear(20, 12), dict(rank=4), [20, 12], [4, 4]),
    (nn.Conv2d(3, 8, 3), dict(rank=4), [3, 8, 3, 3], [3, 4, 3, 3]),  # rank clipped to C_in = 3
    (nn.Conv2d(16, 32, 4), dict(rank=16, kernel_rank=2), [16, 32, 4, 4], [16, 16, 2, 2]),  # official ConvNeXt
    (nn.Conv1d(6, 10, 5), dict(rank=2, kernel_rank=3), [6, 10, 5], [2, 2, 3]),
])
def test_trainable_count(layer, kw, dims, ranks):
    m = one_layer(layer, **kw)
    expected = math.prod(ranks) + sum(d * r for d, r in zip(dims, ranks))
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected
    assert FLoRA(**kw).num_trainable(layer) == expected
    assert list(layer.delta.G.shape) == ranks


# 4. delta-path / merge equivalence for a stride-2, padding-1 conv; fast path = conv with ΔW ----------------------

@pytest.mark.parametrize("conv,x", [
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.randn(2, 4, 9, 8)),
    (nn.Conv2d(4, 6, (3, 5), stride=2, padding=1, dilation=(1, 2), bias=False), torch.randn(2, 4, 11, 12)),
    (nn.Conv1d(5, 3, 3, stride=2, padding=1), torch.randn(2, 5, 9)),
    (nn.Conv3d(2, 3, 3, stride=2, padding=1), torch.randn(1, 2, 5, 6, 5)),
])
def test_conv_fold_equals_unfolded(conv, x):
    W0 = conv.weight.detach().clone()
    m = one_layer(conv, rank=2, kernel_rank=2, alpha=3.0)
    randomize(conv.delta)
    conv_fn = conv.delta.conv
    args = (conv.stride, conv.padding, conv.dilation)
    with torch.no_grad():
        dW = conv.delta.weight()
        adapted = conv(x)
        two_branch = conv_fn(x, W0, conv.bias, *args) + conv_fn(x, dW, None, *args)
        merged = conv_fn(x, W0 + dW, conv.bias, *args)
        torch.testing.assert_close(conv.delta(x), conv_fn(x, dW, None, *args), atol=1e-5, rtol=0)
    torch.testing.assert_close(adapted, two_branch, atol=1e-5, rtol=0)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=0)
    assert (adapted - conv_fn(x, W0, conv.bias, *args)).abs().max() > 1e-2
    ss.fold_(m)
    assert list(m.state_dict()) == ["layer.weight"] + (["layer.bias"] if conv.bias is not None else [])
    torch.testing.assert_close(conv.weight, W0 + dW, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), adapted, atol=1e-5, rtol=0)


# 5. Linear N=2: ΔW = s · B E A with B = U_out, A = U_inᵀ, E = Gᵀ -------------------------------------------------

def test_linear_equals_B_E_A():
    lin = nn.Linear(10, 7)
    W0 = lin.weight.detach().clone()
    m = one_layer(lin, rank=3, alpha=6.0)
    randomize(lin.delta)
    d = lin.delta
    B, E, A = d.U[1], d.G.T, d.U[0].T
    with torch.no_grad():
        expected = 2.0 * B @ E @ A
        torch.testing.assert_close(d.weight(), expected, atol=1e-6, rtol=0)
        x = torch.randn(4, 5, 10)
        adapted = lin(x)
        torch.testing.assert_close(adapted, F.linear(x, W0 + expected, lin.bias), atol=1e-5, rtol=0)
    ss.fold_(m)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), adapted, atol=1e-5, rtol=0)


# 6. full ranks and identity factors: ΔW = s · G with modes 0 and 1 swapped -----------------------------------------

def test_full_rank_identity_factors_is_direct_update():
    conv = nn.Conv2d(3, 4, kernel_size=(3, 2))
    one_layer(conv, rank=4, kernel_rank=3, alpha=8.0)  # ranks clip to [3, 4, 3, 2] = the mode sizes
    d = conv.delta
    assert d.G.shape == (3, 4, 3, 2)
    with torch.no_grad():
        d.G.copy_(torch.randn(d.G.shape))
        for u in d.U:
            u.copy_(torch.eye(u.shape[0]))
    torch.testing.assert_close(d.weight(), 2.0 * d.G.transpose(0, 1), atol=0, rtol=0)


# dropout on the delta input only; validation; bf16 base; linalg -------------------------------------------------

def test_dropout_only_on_branch():
    lin = nn.Linear(8, 8)
    m = one_layer(lin, rank=2, dropout=0.5)
    m.train()
    x = torch.ones(4000, 8)
    with torch.no_grad():
        base = F.linear(x, lin.weight, lin.bias)
        assert torch.equal(lin(x), base)  # ΔW = 0: the base path sees no dropout
        randomize(lin.delta)
        branch = lin(x) - base
        full = x @ lin.delta.weight().T
    assert (branch - full).abs().max(-1).values.gt(1e-3).float().mean() > 0.9  # inputs dropped, per row
    torch.testing.assert_close(branch.mean(0), full[0], atol=0.1 * full.abs().max().item(), rtol=0)  # unbiased
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), base + full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw,field", [
    (dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(kernel_rank=0), "kernel_rank"),
    (dict(dropout=1.0), "dropout"), (dict(init="zeros"), "init"),
])
def test_config_validation(kw, field):
    with pytest.raises(ss.SubspacesError, match=field):
        FLoRA(**kw)


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 4, 3, groups=2), nn.Conv2d(2, 3, 3, padding_mode="reflect"),
                                   nn.Embedding(10, 4)])
def test_unsupported_layers(layer):
    with pytest.raises(ss.SubspacesError, match="flora"):
        one_layer(layer)


def test_bf16_conv_keeps_fp32_params_and_folds():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1).to(torch.bfloat16)
    m = one_layer(conv, rank=2)
    assert all(p.dtype == torch.float32 for p in conv.delta.parameters())
    randomize(conv.delta, std=0.5)
    x = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        adapted = conv(x)
        assert adapted.dtype == torch.bfloat16
        ss.fold_(copy.deepcopy(m))
        folded = F.conv2d(x, conv.weight + conv.delta.weight().to(torch.bfloat16), conv.bias, 2, 1)
    torch.testing.assert_close(folded.float(), adapted.float(), atol=5e-2 * adapted.abs().max().item(), rtol=0)


def test_tucker_product():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(2, 3, 4, generator=g)
    U = [torch.randn(5, 2, generator=g), torch.randn(6, 3, generator=g), torch.randn(7, 4, generator=g)]
    full = tucker_product(G, U)
    torch.testing.assert_close(full, torch.einsum("abc,ia,jb,kc->ijk", G, *U), atol=1e-5, rtol=0)
    partial = tucker_product(G, [None, U[1], None])
    torch.testing.assert_close(partial, torch.einsum("abc,jb->ajc", G, U[1]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="factor 1"):
        tucker_product(G, [U[0], U[0], U[2]])
    with pytest.raises(ValueError, match="3 modes"):
        tucker_product(G, U[:2])
