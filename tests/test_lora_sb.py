"""LoRA-SB faithful tests (methods/adapter-lora-sb.md): r² parameters, the gradient-approximation init
(s B R A = best rank-r approximation of −η₁ sign(Ĝ), exact at full rank), the gradient identity of R, fold
equivalence, exact reload of gradient-derived factors, and the documented plain init (ΔW = 0)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ids, llama_causal, logits
from torch import nn
from transformers.pytorch_utils import Conv1D

import subspaces as ss
from subspaces.adapters import LoRASB
from subspaces.adapters._core import adapted_layers
from subspaces.adapters.lora_sb import init_from_gradients_

TARGETS = ["0", "2"]


def toy() -> nn.Module:
    """Linear 6→10 (d_out > d_in), then a GPT-2 Conv1D 10→5 (weight stored (d_in, d_out))."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), Conv1D(5, 10)).train()


def batches(n: int = 3):
    g = torch.Generator().manual_seed(4)
    return [(torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)) for _ in range(n)]


def mse(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def summed_grads(model: nn.Module) -> list[torch.Tensor]:
    """Ĝ = Σ_batches ∇_W L for the two target weights, as (d_out, d_in)."""
    m = copy.deepcopy(model).requires_grad_(True)
    for b in batches():
        mse(m, b).backward()
    return [m[0].weight.grad, m[2].weight.grad.T]


def out_in(dw: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    return dw.T if isinstance(layer, Conv1D) else dw


# 1. trainable count r²; B, A, W0 get no gradient ------------------------------------------------------------

def test_trainable_count_is_r_squared():
    m = toy()
    ss.adapt_(m, "lora_sb", rank=3, targets=TARGETS)
    init_from_gradients_(m, batches(), mse, lr=1e-2)
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == 2 * 9
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["0.delta.R", "2.delta.R"]
    assert LoRASB(rank=3).num_trainable(m[0]) == 9
    mse(m, batches(1)[0]).backward()
    assert all(p.grad is None for n, p in m.named_parameters() if not n.endswith("delta.R"))
    assert all(not layer.delta.A.requires_grad and not layer.delta.B.requires_grad for _, layer in adapted_layers(m))


# 3. init: s B R A = best rank-r approximation of ΔW₁ = −η₁ sign(Ĝ) -----------------------------------------

@pytest.mark.parametrize("alpha", [None, 5.0])
def test_gradient_init_is_truncated_svd_of_sign_step(alpha):
    base = toy()
    G = summed_grads(base)
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora_sb", rank=2, alpha=alpha, targets=TARGETS)
    init_from_gradients_(m, batches(), mse, lr=3e-3, warmup_steps=6)
    eta = 3e-3 / 6
    for g, layer in zip(G, (m[0], m[2])):
        d = layer.delta
        U, S, Vh = torch.linalg.svd(-eta * torch.sign(g.double()), full_matrices=False)
        best = U[:, :2] @ torch.diag(S[:2]) @ Vh[:2]
        torch.testing.assert_close(out_in(d.weight(), layer).double(), best, atol=1e-7, rtol=1e-5)
        s = 1.0 if alpha is None else alpha / 2
        torch.testing.assert_close(d.R, torch.diag(S[:2]).float() / s, atol=1e-7, rtol=1e-5)  # R = Σ_r / s
        torch.testing.assert_close(d.B.T @ d.B, torch.eye(2), atol=1e-5, rtol=0)
        torch.testing.assert_close(d.A @ d.A.T, torch.eye(2), atol=1e-5, rtol=0)
    # W0 is not corrected: the model now holds the approximate first step; nothing else moved
    for k, v in base.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    x = batches(1)[0][0]
    assert (m(x) - base(x)).abs().max() > 1e-4
    assert m.training and all(layer.delta.active for _, layer in adapted_layers(m))
    assert not any(p.requires_grad for n, p in m.named_parameters() if "delta" not in n)
    assert all(p.grad is None for p in m.parameters())


def test_full_rank_reproduces_the_sign_step():
    base = toy()
    G = summed_grads(base)
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora_sb", rank=5, targets=["2"])  # Conv1D 10 -> 5: min(d_in, d_out) = 5
    ss.adapt_(m, "lora_sb", rank=6, targets=["0"])  # Linear 6 -> 10: min = 6
    init_from_gradients_(m, batches(), mse, lr=1e-3)
    for g, layer in zip(G, (m[0], m[2])):
        torch.testing.assert_close(out_in(layer.delta.weight(), layer), -1e-3 * torch.sign(g), atol=1e-8, rtol=1e-5)


def test_estimate_is_the_base_models_gradient():
    """A second call re-estimates at W0 (adapters bypassed), not at W0 + ΔW₁: the same factors come back."""
    m = toy()
    ss.adapt_(m, "lora_sb", rank=2, targets=TARGETS)
    init_from_gradients_(m, batches(), mse, lr=1.0)
    first = [layer.delta.weight().detach().clone() for _, layer in adapted_layers(m)]
    init_from_gradients_(m, batches(), mse, lr=1.0)
    for w, (_, layer) in zip(first, adapted_layers(m)):
        torch.testing.assert_close(layer.delta.weight(), w, atol=1e-5, rtol=0)


def test_plain_init_is_weight_svd_with_zero_core():
    base = llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora_sb", rank=4, targets="all-linear")
    x = ids()
    assert torch.equal(logits(m, x), logits(base, x))  # R = 0: exactly the base
    layer = m.model.layers[0].mlp.down_proj
    d = layer.delta
    U, S, Vh = torch.linalg.svd(layer.weight.detach().double(), full_matrices=False)
    torch.testing.assert_close((d.B @ d.A).double(), U[:, :4] @ Vh[:4], atol=1e-5, rtol=0)
    assert torch.equal(d.R, torch.zeros(4, 4))


def test_hf_loss_default_and_randomized_svd():
    base = llama_causal()
    data = [{"input_ids": ids(seed=s), "labels": ids(seed=s)} for s in range(2)]
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    ss.adapt_(a, "lora_sb", rank=2, targets=["q_proj", "up_proj"])
    ss.adapt_(b, "lora_sb", rank=2, targets=["q_proj", "up_proj"])
    init_from_gradients_(a, data, lr=1e-2)  # loss_fn defaults to model(**batch).loss
    init_from_gradients_(b, data, lr=1e-2, svd="randomized")
    assert not a.training  # the mode it had before
    for (_, la), (_, lb) in zip(adapted_layers(a), adapted_layers(b)):
        torch.testing.assert_close(la.delta.weight(), lb.delta.weight(), atol=1e-5, rtol=1e-4)


# 4. gradient identity: ∂L/∂R = s Bᵀ (∂L/∂W) Aᵀ ----------------------------------------------------------

def test_gradient_of_r():
    m = toy()
    ss.adapt_(m, "lora_sb", rank=3, alpha=7.0, targets=TARGETS)
    init_from_gradients_(m, batches(), mse, lr=0.1)
    x, y = batches(1)[0]
    mse(m, (x, y)).backward()
    for i in (0, 2):
        d = m[i].delta
        W = (out_in(m[i].weight.detach(), m[i]) + out_in(d.weight().detach(), m[i])).requires_grad_()
        h = x
        for j, module in enumerate(m):  # the same network with layer i as a plain linear map of W0 + ΔW
            h = F.linear(h, W, module.bias) if j == i else module(h)
        (G,) = torch.autograd.grad(F.mse_loss(h, y), W)  # ∂L/∂W, leaving R.grad alone
        torch.testing.assert_close(d.R.grad, 7.0 / 3 * d.B.T @ G @ d.A.T, atol=1e-7, rtol=1e-5)


# 5. fold: W0 + sBRA reproduces the adapter; gradient-derived factors reload exactly ------------------------------

def test_fold_and_exact_reload(tmp_path):
    base = toy()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora_sb", rank=2, targets=TARGETS)
    init_from_gradients_(m, batches(), mse, lr=0.05)
    x = batches(1)[0][0]
    y = m(x).detach()
    ss.save_adapter(m, tmp_path / "a")
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")  # B, A cannot be recomputed from W0
    assert torch.equal(loaded(x), y)
    ss.fold_(m)
    assert list(m.state_dict()) == list(base.state_dict())
    torch.testing.assert_close(m(x), y, atol=1e-6, rtol=0)


def test_bf16_gradient_init_keeps_fp32_factors():
    m = llama_causal().to(torch.bfloat16)
    ss.adapt_(m, "lora_sb", rank=2, targets=["v_proj"])
    init_from_gradients_(m, [{"input_ids": ids(), "labels": ids()}], lr=1e-2)
    d = m.model.layers[0].self_attn.v_proj.delta
    assert d.R.dtype == d.A.dtype == torch.float32 and d.R.abs().sum() > 0
    assert m.model.layers[0].self_attn.v_proj.weight.dtype == torch.bfloat16


def test_errors():
    with pytest.raises(ss.SubspacesError, match="alpha"):
        LoRASB(alpha=0.0)
    m = toy()
    with pytest.raises(ss.SubspacesError, match="no lora_sb adapter"):
        init_from_gradients_(m, batches(), mse, lr=1e-3)
    ss.adapt_(m, "lora_sb", rank=2, targets=TARGETS)
    with pytest.raises(ss.SubspacesError, match="empty"):
        init_from_gradients_(m, [], mse, lr=1e-3)
    with pytest.raises(ss.SubspacesError, match="lr"):
        init_from_gradients_(m, batches(), mse, lr=0)
    with pytest.raises(ss.SubspacesError, match=r"\.loss"):
        init_from_gradients_(m, [torch.randn(2, 6)], lr=1e-3)
    assert all(layer.delta.active for _, layer in adapted_layers(m))
    assert not any(p.requires_grad for n, p in m.named_parameters() if "delta" not in n)
