"""SVFit faithful tests (methods/adapter-svfit.md): identity at init, count r, the σ' gradient, the energy rule,
merge equivalence and a ΔW diagonal in the pretrained singular basis."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ids, llama_causal, logits, with_spectrum
from torch import nn

import subspaces as ss
from subspaces.adapters import SVFit
from subspaces.adapters._core import adapted_layers
from subspaces.adapters.svfit import energy_rank


def one_layer(layer: nn.Module, **kw) -> nn.Module:
    m = nn.Module()
    m.layer = layer
    ss.adapt_(m, "svfit", targets=["layer"], **kw)
    return m


def perturb(delta, seed: int = 0, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta.sigma.add_(torch.randn(delta.sigma.shape, generator=g) * std)


# 1. ΔW = 0 at init; U_r diag(σ) V_rᵀ + W_e reconstructs W0 --------------------------------------------------

def test_identity_at_init_bit_exact():
    base = llama_causal()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "svfit", targets="all-linear")
    assert torch.equal(logits(m, x), logits(base, x))
    perturb(adapted_layers(m)[0][1].delta)
    assert not torch.allclose(logits(m, x), logits(base, x))


def test_rank_r_split_reconstructs_w0():
    torch.manual_seed(0)
    lin = nn.Linear(14, 10)
    W0 = lin.weight.detach().clone()
    one_layer(lin, rank=4)
    d = lin.delta
    W_r = (d.U * d.sigma0) @ d.Vh
    W_e = W0 - W_r
    S = torch.linalg.svdvals(W0)
    torch.testing.assert_close(d.sigma0, S[:4], atol=1e-6, rtol=0)  # the top-r triplets, not any r
    torch.testing.assert_close(torch.linalg.svdvals(W_e)[:6], S[4:], atol=1e-5, rtol=0)  # the frozen residual
    torch.testing.assert_close(W_r + W_e, W0, atol=1e-6, rtol=0)
    torch.testing.assert_close(d.U.T @ d.U, torch.eye(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.Vh @ d.Vh.T, torch.eye(4), atol=1e-5, rtol=0)
    one = nn.Linear(14, 10)
    with torch.no_grad():
        one.weight.copy_(W0)
    one_layer(one, rank=10)  # r = k: U diag(σ) Vᵀ is W0 itself
    torch.testing.assert_close((one.delta.U * one.delta.sigma0) @ one.delta.Vh, W0, atol=1e-5, rtol=0)


# 2. r trainable values; U_r, V_r, W_e get no gradient ---------------------------------------------------------

def test_trainable_count_and_frozen_factors():
    from transformers.pytorch_utils import Conv1D

    for layer, r in [(nn.Linear(20, 12), 5), (Conv1D(24, 10), 3)]:
        m = one_layer(layer, rank=r)
        assert [n for n, p in m.named_parameters() if p.requires_grad] == ["layer.delta.sigma"]
        assert sum(p.numel() for p in ss.adapter_parameters(m)) == r == SVFit(rank=r).num_trainable(layer)
        assert {"U", "Vh", "sigma0"} <= set(dict(layer.delta.named_buffers()))
        layer(torch.randn(3, 20 if r == 5 else 10)).pow(2).sum().backward()
        assert layer.delta.sigma.grad is not None and layer.weight.grad is None
        assert all(not b.requires_grad for b in layer.delta.buffers())


# 3. ∂L/∂σ'_i = u_iᵀ G v_i with G = ∂L/∂W --------------------------------------------------------------------

def test_sigma_gradient_is_diagonal_of_weight_gradient():
    torch.manual_seed(0)
    lin = nn.Linear(14, 10)
    one_layer(lin, rank=6)
    d = lin.delta
    perturb(d)  # away from init, so G is taken at W0 + ΔW
    x, target = torch.randn(8, 14), torch.randn(8, 10)
    F.mse_loss(lin(x), target).backward()
    W = (lin.weight + d.weight()).detach().requires_grad_(True)
    F.mse_loss(F.linear(x, W, lin.bias), target).backward()
    G = W.grad
    expected = torch.diagonal(d.U.T @ G @ d.Vh.T)
    torch.testing.assert_close(d.sigma.grad, expected, atol=1e-6, rtol=1e-5)
    assert expected.abs().min() > 0


# 4. the energy rule -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("energy,r", [(0.3, 1), (0.6, 2), (0.9, 3), (0.97, 4), (0.995, 5)])
def test_energy_rule_on_known_spectrum(energy, r):
    # σ² fractions 0.5, 0.3, 0.15, 0.04, 0.01 -> cumulative 0.5, 0.8, 0.95, 0.99, 1.0
    S = [(f * 100) ** 0.5 for f in (0.5, 0.3, 0.15, 0.04, 0.01)]
    assert energy_rank(torch.tensor(S), energy) == r
    lin = with_spectrum(S)
    assert SVFit(energy=energy).num_trainable(lin) == r
    one_layer(lin, energy=energy)
    assert lin.delta.sigma.numel() == r
    torch.testing.assert_close(lin.delta.sigma0, torch.tensor(S[:r]), atol=1e-5, rtol=0)
    assert SVFit(energy=1.0).num_trainable(lin) == 10  # energy=1 keeps all min(d_out, d_in) values


def test_energy_adapter_saves_and_reloads_exactly(tmp_path):
    base = llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, "svfit", energy=0.9, targets="all-linear")
    ranks = {n: layer.delta.sigma.numel() for n, layer in adapted_layers(m)}
    assert len(set(ranks.values())) > 1  # per-layer r from each spectrum
    for _, layer in adapted_layers(m):
        perturb(layer.delta)
    ss.save_adapter(m, tmp_path / "a")
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    x = ids()
    assert torch.equal(logits(loaded, x), logits(m, x))
    assert {n: layer.delta.sigma.numel() for n, layer in adapted_layers(loaded)} == ranks


# 5. merge equivalence; ΔW diagonal in the pretrained singular basis ----------------------------------------

def test_fold_and_delta_is_diagonal_in_singular_basis():
    torch.manual_seed(0)
    lin = nn.Linear(14, 10)
    W0 = lin.weight.detach().clone()
    m = one_layer(lin, rank=10)
    d = lin.delta
    perturb(d)
    x = torch.randn(5, 14)
    with torch.no_grad():
        adapted = lin(x)
        dW = d.weight()
        core = d.U.T @ dW @ d.Vh.T
    torch.testing.assert_close(core, torch.diag(d.sigma - d.sigma0).detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(dW, (d.U * (d.sigma - d.sigma0)) @ d.Vh, atol=0, rtol=0)
    ss.fold_(m)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), adapted, atol=1e-5, rtol=0)
    # the folded weight is U diag(σ') Vᵀ: its singular values are |σ'|
    torch.testing.assert_close(torch.linalg.svdvals(lin.weight).sort().values,
                               d.sigma.detach().abs().sort().values, atol=1e-5, rtol=0)
    assert not torch.equal(lin.weight, W0)


def test_conv1d_fold():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(24, 10)
    m = one_layer(layer, rank=4)
    perturb(layer.delta)
    x = torch.randn(3, 10)
    with torch.no_grad():
        adapted = layer(x)
    ss.fold_(m)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=0)


def test_config_validation():
    for bad in [dict(rank=0), dict(rank=2.5), dict(energy=0.0), dict(energy=1.5)]:
        with pytest.raises(ss.SubspacesError, match="svfit"):
            SVFit(**bad)
    with pytest.raises(ss.SubspacesError, match="rank=11"):
        one_layer(nn.Linear(14, 10), rank=11)
    with pytest.raises(ss.SubspacesError, match="Conv2d"):
        one_layer(nn.Conv2d(3, 4, 3), rank=1)
