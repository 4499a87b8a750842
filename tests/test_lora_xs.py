"""LoRA-XS faithful tests (methods/adapter-lora-sb.md): r² parameters, SVD factors of W0, near-zero R, the gradient
identity of R, fold equivalence, exact reload of the frozen factors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ids, llama_causal, logits
from torch import nn
from transformers.pytorch_utils import Conv1D

import subspaces as ss
from subspaces.adapters import LoRAXS
from subspaces.adapters._core import adapted_layers


def one_layer(layer: nn.Module, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Module()
    m.layer = layer
    ss.adapt_(m, "lora_xs", targets=["layer"], **kw)
    return m


def w_out_in(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (d_out, d_in), whatever its storage layout."""
    return layer.weight.detach().T if isinstance(layer, Conv1D) else layer.weight.detach()


def make(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(20, 12) if kind == "linear" else Conv1D(14, 24)  # Conv1D(nf=d_out, nx=d_in): weight (d_in, d_out)


KINDS = ["linear", "conv1d"]


# 1. trainable count r²; B, A, W0 get no gradient ------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rank", [1, 4])
def test_trainable_count_is_r_squared(kind, rank):
    layer = make(kind)
    m = one_layer(layer, rank=rank)
    d = m.layer.delta
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["layer.delta.R"]
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == rank * rank == LoRAXS(rank=rank).num_trainable(layer)
    x = torch.randn(3, w_out_in(layer).shape[1])
    m.layer(x).pow(2).sum().backward()
    assert d.R.grad is not None and d.R.grad.abs().sum() > 0
    assert layer.weight.grad is None and not d.A.requires_grad and not d.B.requires_grad
    assert {"A", "B", "R"} <= set(d.state_dict())  # the frozen factors are persistent buffers


# 2. factors from the SVD of W0: BᵀB = I, AAᵀ = Σ², BA = best rank-r approximation; ΔW tiny --------------------

@pytest.mark.parametrize("kind", KINDS)
def test_factors_are_the_svd_of_w0(kind):
    layer = make(kind)
    r = 5
    W0 = w_out_in(layer).clone()
    m = one_layer(layer, rank=r)
    d = m.layer.delta
    U, S, Vh = torch.linalg.svd(W0.double(), full_matrices=False)
    assert d.B.shape == (W0.shape[0], r) and d.A.shape == (r, W0.shape[1])
    torch.testing.assert_close(d.B.T @ d.B, torch.eye(r), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.A @ d.A.T, torch.diag(S[:r] ** 2).float(), atol=1e-5, rtol=0)
    BA = (d.B @ d.A).double()
    torch.testing.assert_close(BA, U[:, :r] @ torch.diag(S[:r]) @ Vh[:r], atol=1e-5, rtol=0)
    err = torch.linalg.norm(BA - W0.double())
    torch.testing.assert_close(err, S[r:].pow(2).sum().sqrt(), atol=1e-5, rtol=0)  # Eckart–Young error


def test_delta_at_init_is_tiny_and_output_close_to_base():
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    m = one_layer(layer, rank=16, alpha=16.0)
    d = m.layer.delta
    s, S = 1.0, torch.linalg.svdvals(layer.weight.detach())[:16]
    assert abs(d.R.std().item() - 1e-5) < 2e-6 and d.R.abs().sum() > 0  # N(0, 1e-10), not exactly zero
    dw = d.weight()
    torch.testing.assert_close(torch.linalg.norm(dw), s * torch.linalg.norm(d.R * S), rtol=1e-4, atol=0)
    expected = s * 1e-5 * 16 ** 0.5 * torch.linalg.norm(S)
    assert 0.7 < (torch.linalg.norm(dw) / expected).item() < 1.3
    base = llama_causal()
    a = copy.deepcopy(base)
    ss.adapt_(a, "lora_xs", rank=4, targets="all-linear")
    x = ids()
    diff = (logits(a, x) - logits(base, x)).abs().max().item()
    assert 0 < diff < 1e-3
    z = copy.deepcopy(base)
    ss.adapt_(z, "lora_xs", rank=4, init_std=0.0, targets="all-linear")
    assert torch.equal(logits(z, x), logits(base, x))  # init_std=0: ΔW = 0 bit for bit


# 4. gradient identity: ∂L/∂R = s Bᵀ (∂L/∂W) Aᵀ ----------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_gradient_of_r(kind):
    layer = make(kind)
    m = one_layer(layer, rank=3, alpha=7.0)
    d = m.layer.delta
    with torch.no_grad():
        d.R.normal_(std=0.5)
    x = torch.randn(5, w_out_in(layer).shape[1])
    target = torch.randn(5, w_out_in(layer).shape[0])
    F.mse_loss(m.layer(x), target).backward()
    W = (w_out_in(layer) + (d.weight().T if isinstance(layer, Conv1D) else d.weight())).detach().requires_grad_()
    F.mse_loss(F.linear(x, W, layer.bias), target).backward()
    s = 7.0 / 3
    torch.testing.assert_close(d.R.grad, s * d.B.T @ W.grad @ d.A.T, atol=1e-6, rtol=1e-5)


# 5. fold: W0 + sBRA reproduces the adapter's outputs; save/load is exact --------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_fold_equals_adapter(kind):
    layer = make(kind)
    m = one_layer(layer, rank=4)
    with torch.no_grad():
        m.layer.delta.R.normal_(std=0.3)
    x = torch.randn(2, 3, w_out_in(layer).shape[1])
    y = m.layer(x).detach()
    dw = m.layer.delta.weight().detach()
    assert dw.shape == layer.weight.shape
    ss.fold_(m)
    assert list(m.state_dict()) == ["layer.weight", "layer.bias"]
    torch.testing.assert_close(m.layer(x), y, atol=1e-5, rtol=0)


def test_save_load_keeps_factors(tmp_path):
    base = llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, LoRAXS(rank=3), targets=["q_proj", "down_proj"])
    with torch.no_grad():
        for _, layer in adapted_layers(m):
            layer.delta.R.normal_(std=0.5)
    ss.save_adapter(m, tmp_path / "a")
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    for (_, a), (_, b) in zip(adapted_layers(m), adapted_layers(loaded)):
        for k in ("A", "B", "R"):
            assert torch.equal(getattr(a.delta, k), getattr(b.delta, k))
    x = ids()
    assert torch.equal(logits(loaded, x), logits(m, x))


def test_bf16_base_keeps_fp32_factors():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8).to(torch.bfloat16)
    m = one_layer(layer, rank=4)
    d = m.layer.delta
    assert d.A.dtype == d.B.dtype == d.R.dtype == torch.float32
    S = torch.linalg.svdvals(layer.weight.float())[:4]
    torch.testing.assert_close(torch.linalg.norm(d.A, dim=1), S, atol=1e-5, rtol=0)
    assert m.layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_config_errors():
    with pytest.raises(ss.SubspacesError, match="rank=0"):
        LoRAXS(rank=0)
    with pytest.raises(ss.SubspacesError, match="alpha"):
        LoRAXS(alpha=-1.0)
    with pytest.raises(ss.SubspacesError, match="init_std"):
        LoRAXS(init_std=-1.0)
    with pytest.raises(ss.SubspacesError, match=r"rank=9 must be <= min\(d_in, d_out\) = 8"):
        one_layer(nn.Linear(16, 8), rank=9)
    with pytest.raises(ss.SubspacesError, match="cannot adapt a Embedding"):
        one_layer(nn.Embedding(10, 4), rank=2)
