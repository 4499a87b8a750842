"""LoRA faithful tests (methods/adapter-lora.md) plus the layer types, dropout and PiSSA initialization."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import bert_seqcls, ids, llama_causal, logits, plain, plain_inputs, randomize_adapters
from torch import nn

import subspaces as ss
from subspaces.adapters import LoRA
from subspaces.adapters._core import adapted_layers

ALL_PLAIN = ["emb", "conv1", "conv2", "fc1", "fc2"]


def one_layer(layer: nn.Module, **kw) -> nn.Module:
    """``layer`` wrapped in a container so it can be targeted by name."""
    torch.manual_seed(0)
    m = nn.Module()
    m.layer = layer
    ss.adapt_(m, "lora", targets=["layer"], **kw)
    return m


def rand_ab(delta, seed=0, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        delta.A.copy_(torch.randn(delta.A.shape, generator=g) * std)
        delta.B.copy_(torch.randn(delta.B.shape, generator=g) * std)


# 1. ΔW = 0 at init: bit-for-bit the frozen model --------------------------------------------------------------

@pytest.mark.parametrize("build,inputs,targets", [
    (bert_seqcls, ids, "all-linear"),
    (llama_causal, ids, "all-linear"),
    (plain, plain_inputs, ALL_PLAIN),
])
@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_identity_at_init_bit_exact(build, inputs, targets, init):
    base = build()
    x = inputs()
    ref = logits(base, x)
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, alpha=16, init=init, targets=targets)
    assert adapted_layers(m)
    assert torch.equal(logits(m, x), ref)
    # the branch really is live: after a nonzero B the output moves
    randomize_adapters(m)
    assert not torch.allclose(logits(m, x), ref)


def test_init_distributions():
    torch.manual_seed(0)
    m = one_layer(nn.Linear(64, 48), rank=8)
    d = m.layer.delta
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=√5) = U(-1/√d_in, 1/√d_in)
    assert d.A.abs().max() <= bound and d.A.abs().max() > 0.8 * bound
    assert torch.equal(d.B, torch.zeros(48, 8))
    m = one_layer(nn.Linear(400, 300), rank=8, init="gaussian")
    assert abs(m.layer.delta.A.std().item() - 1 / 8) < 0.01
    m = one_layer(nn.Embedding(200, 16), rank=4)
    d = m.layer.delta
    assert torch.equal(d.A, torch.zeros(4, 200))
    assert abs(d.B.std().item() - 1.0) < 0.3 and d.B.abs().sum() > 0


# 2. trainable count r(d_in + d_out); W0 and b frozen -------------------------------------------------------

@pytest.mark.parametrize("layer,d_in,d_out", [
    (nn.Linear(20, 12), 20, 12),
    (nn.Conv1d(6, 10, 3), 6 * 3, 10),
    (nn.Conv2d(3, 8, 3), 3 * 9, 8),
    (nn.Embedding(50, 16), 50, 16),
])
def test_trainable_count(layer, d_in, d_out):
    r = 2
    m = one_layer(layer, rank=r)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == r * (d_in + d_out)
    assert LoRA(rank=r).num_trainable(layer) == r * (d_in + d_out)
    assert not layer.weight.requires_grad
    if getattr(layer, "bias", None) is not None:
        assert not layer.bias.requires_grad


def test_trainable_count_bert():
    m = bert_seqcls()
    ss.adapt_(m, "lora", rank=4, targets=["query", "value"])
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n == 4 * 4 * (32 + 32)
    assert n == sum(LoRA(rank=4).num_trainable(layer) for _, layer in adapted_layers(m))


def test_trainable_count_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(24, 10)  # nf=d_out=24, nx=d_in=10; weight (d_in, d_out)
    m = one_layer(layer, rank=3)
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == 3 * (10 + 24)
    assert LoRA(rank=3).num_trainable(layer) == 3 * (10 + 24)


# 3. fold equivalence; unadapt restores W0 -------------------------------------------------------------------

def test_fold_equals_plain_linear_and_unadapt_restores():
    lin = nn.Linear(20, 12)
    W0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    m = one_layer(lin, rank=3, alpha=6)
    rand_ab(lin.delta)
    x = torch.randn(5, 20)
    with torch.no_grad():
        adapted = lin(x)
        d = lin.delta
        expected = F.linear(x, W0, b0) + 2.0 * x @ d.A.T @ d.B.T
        W_merged = W0 + lin.delta.weight()
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(F.linear(x, W_merged, b0), adapted, atol=1e-5, rtol=0)
    m2 = copy.deepcopy(m)
    ss.fold_(m2)
    torch.testing.assert_close(m2.layer.weight, W_merged, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(m2.layer(x), adapted, atol=1e-5, rtol=0)
    ss.unadapt_(m)
    assert torch.equal(lin.weight, W0) and torch.equal(lin.bias, b0)
    assert lin.weight.requires_grad and lin.bias.requires_grad


def test_fold_gpt2_conv1d():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(24, 10)
    W0 = layer.weight.detach().clone()
    m = one_layer(layer, rank=3, alpha=5)
    rand_ab(layer.delta)
    x = torch.randn(4, 10)
    with torch.no_grad():
        d = layer.delta
        expected = x @ W0 + layer.bias + (5 / 3) * x @ d.A.T @ d.B.T
        adapted = layer(x)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=0)
    ss.fold_(m)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=0)


def test_fold_whole_models():
    for build, inputs, targets in [(llama_causal, ids, "all-linear"), (plain, plain_inputs, ALL_PLAIN)]:
        m = build()
        x = inputs()
        ss.adapt_(m, "lora", rank=2, alpha=4, targets=targets)
        randomize_adapters(m)
        adapted = logits(m, x)
        ss.fold_(m)
        torch.testing.assert_close(logits(m, x), adapted, atol=1e-5, rtol=0)


# 4. scaling ----------------------------------------------------------------------------------------------------

def branch(layer, x):
    with torch.no_grad():
        out = layer(x)
        with ss.adapters_disabled(layer):
            return out - layer(x)


@pytest.mark.parametrize("rslora", [False, True])
def test_alpha_doubling_doubles_the_branch(rslora):
    lin = nn.Linear(16, 16)
    x = torch.randn(3, 16)
    one_layer(lin, rank=4, alpha=3.0, rslora=rslora)
    rand_ab(lin.delta)
    A, B = lin.delta.A.detach().clone(), lin.delta.B.detach().clone()
    b1 = branch(lin, x)
    lin2 = nn.Linear(16, 16)
    one_layer(lin2, rank=4, alpha=6.0, rslora=rslora)
    with torch.no_grad():
        lin2.delta.A.copy_(A)
        lin2.delta.B.copy_(B)
        lin2.weight.copy_(lin.weight)
        lin2.bias.copy_(lin.bias)
    b2 = branch(lin2, x)
    assert b1.abs().max() > 0.1
    torch.testing.assert_close(b2, 2 * b1, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("r", [1, 4, 9])
def test_rslora_scaling(r):
    lin = nn.Linear(24, 20)
    x = torch.randn(3, 24)
    one_layer(lin, rank=r, alpha=6.0, rslora=True)
    assert lin.delta.scaling == pytest.approx(6.0 / math.sqrt(r))
    assert LoRA(rank=r, alpha=6.0, rslora=True).scaling == pytest.approx(6.0 / math.sqrt(r))
    assert LoRA(rank=r, alpha=6.0).scaling == pytest.approx(6.0 / r)
    rand_ab(lin.delta)
    d = lin.delta
    expected = (6.0 / math.sqrt(r)) * x @ d.A.T.detach() @ d.B.T.detach()
    torch.testing.assert_close(branch(lin, x), expected, atol=1e-5, rtol=1e-5)


# 5. convolutions and embeddings ----------------------------------------------------------------------------

def test_conv2d_stride2_padding1_merged_kernel_equals_two_conv_branch():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    K0 = conv.weight.detach().clone()
    one_layer(conv, rank=2, alpha=4)
    rand_ab(conv.delta)
    d = conv.delta
    assert d.A.shape == (2, 3, 3, 3) and d.B.shape == (8, 2, 1, 1)
    x = torch.randn(2, 3, 11, 9)
    with torch.no_grad():
        two_conv = F.conv2d(F.conv2d(x, d.A, None, stride=2, padding=1), d.B) * 2.0
        dK = d.weight()
        # ΔK[o,i,:,:] = s Σ_j B[o,j] A[j,i,:,:]
        torch.testing.assert_close(dK, 2.0 * torch.einsum("oj,jikl->oikl", d.B[:, :, 0, 0], d.A), atol=1e-6, rtol=0)
        merged = F.conv2d(x, dK, None, stride=2, padding=1)
        torch.testing.assert_close(merged, two_conv, atol=1e-5, rtol=0)
        torch.testing.assert_close(branch(conv, x), two_conv, atol=1e-5, rtol=0)
        adapted = conv(x)
        torch.testing.assert_close(F.conv2d(x, K0 + dK, conv.bias, stride=2, padding=1), adapted, atol=1e-5, rtol=0)
    ss.fold_(conv)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), adapted, atol=1e-5, rtol=0)


def test_conv1d_dilation_padding():
    conv = nn.Conv1d(6, 10, kernel_size=3, stride=2, padding=2, dilation=2)
    one_layer(conv, rank=3, alpha=3)
    rand_ab(conv.delta)
    d = conv.delta
    x = torch.randn(2, 6, 17)
    with torch.no_grad():
        expected = F.conv1d(F.conv1d(x, d.A, None, stride=2, padding=2, dilation=2), d.B)
        torch.testing.assert_close(branch(conv, x), expected, atol=1e-5, rtol=0)
        adapted = conv(x)
    ss.fold_(conv)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), adapted, atol=1e-5, rtol=0)


def test_grouped_conv_is_refused():
    with pytest.raises(ss.SubspacesError, match="groups"):
        one_layer(nn.Conv2d(4, 8, 3, groups=2), rank=2)


def test_embedding_lookup_and_fold():
    emb = nn.Embedding(30, 8, padding_idx=0)
    E0 = emb.weight.detach().clone()
    one_layer(emb, rank=2, alpha=4)
    rand_ab(emb.delta)
    d = emb.delta
    x = torch.tensor([[0, 3, 29, 3], [7, 1, 2, 0]])
    with torch.no_grad():
        expected = E0[x] + 2.0 * (d.A.T[x] @ d.B.T)
        adapted = emb(x)
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=0)
    ss.fold_(emb)
    with torch.no_grad():
        torch.testing.assert_close(emb(x), adapted, atol=1e-5, rtol=0)
        torch.testing.assert_close(emb.weight, E0 + 2.0 * (d.B @ d.A).T, atol=1e-5, rtol=0)


# dropout ---------------------------------------------------------------------------------------------------------

def test_dropout_acts_only_on_the_branch():
    lin = nn.Linear(16, 16)
    m = one_layer(lin, rank=4, alpha=4, dropout=0.5)
    x = torch.randn(8, 16)
    with torch.no_grad():
        base = F.linear(x, lin.weight, lin.bias)
        m.train()
        # B = 0: whatever dropout does, the frozen path is untouched, even in train mode
        assert torch.equal(lin(x), base)
        rand_ab(lin.delta)
        m.eval()
        d = lin.delta
        torch.testing.assert_close(lin(x), base + x @ d.A.T @ d.B.T, atol=1e-5, rtol=0)
        m.train()
        torch.manual_seed(3)
        train_out = lin(x)
        torch.manual_seed(3)
        xd = F.dropout(x, 0.5, training=True)
        torch.testing.assert_close(train_out, base + xd @ d.A.T @ d.B.T, atol=1e-5, rtol=0)
        assert not torch.allclose(train_out, base + x @ d.A.T @ d.B.T)
        with ss.adapters_disabled(m):
            assert torch.equal(lin(x), base)


def test_dropout_follows_the_mode_of_the_model(tmp_path):
    # adapting (or loading onto) a model in eval mode must not switch the branch's dropout on
    base = bert_seqcls()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, dropout=0.5, targets=["query", "value"])
    assert all(not mod.training for mod in m.modules())
    randomize_adapters(m)
    x = ids()
    torch.manual_seed(0)
    a = logits(m, x)
    assert torch.equal(a, logits(m, x))
    ss.save_adapter(m, tmp_path / "a")
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert all(not mod.training for mod in loaded.modules())
    assert torch.equal(logits(loaded, x), a)
    train_model = copy.deepcopy(base).train()
    ss.adapt_(train_model, "lora", rank=4, dropout=0.5, targets=["query"])
    assert train_model.bert.encoder.layer[0].attention.self.query.delta.training


def test_dropout_model_level_eval_is_deterministic():
    m = bert_seqcls()
    ss.adapt_(m, "lora", rank=4, dropout=0.3, targets=["query", "value"])
    randomize_adapters(m)
    x = ids()
    m.eval()
    assert torch.equal(logits(m, x), logits(m, x))
    m.train()
    torch.manual_seed(0)
    a = logits(m, x)
    torch.manual_seed(1)
    assert not torch.allclose(a, logits(m, x))


# PiSSA --------------------------------------------------------------------------------------------------------

def test_pissa_identity_and_residual():
    torch.manual_seed(0)
    lin = nn.Linear(24, 20)
    W = lin.weight.detach().clone()
    x = torch.randn(5, 24)
    with torch.no_grad():
        ref = lin(x)
    m = one_layer(lin, rank=4, alpha=8, init="pissa")
    with torch.no_grad():
        torch.testing.assert_close(lin(x), ref, atol=1e-5, rtol=0)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    principal = (U[:, :4] * S[:4]) @ Vh[:4]
    torch.testing.assert_close(lin.weight.double(), W.double() - principal, atol=1e-5, rtol=0)
    torch.testing.assert_close(lin.delta.weight().double(), principal, atol=1e-5, rtol=0)
    # the residual's spectrum is W's without the top r singular values
    torch.testing.assert_close(torch.linalg.svdvals(lin.weight.double())[:16], S[4:], atol=1e-5, rtol=0)
    with torch.no_grad():
        lin.delta.B.add_(0.1)  # "training"
    ss.unadapt_(m)
    torch.testing.assert_close(lin.weight, W, atol=1e-5, rtol=0)
    assert lin.weight.requires_grad


def test_pissa_fold_and_model_identity():
    base = llama_causal()
    x = ids()
    ref = logits(base, x)
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, alpha=4, init="pissa", targets=["q_proj", "o_proj", "up_proj"])
    torch.testing.assert_close(logits(m, x), ref, atol=1e-5, rtol=0)
    with pytest.raises(ss.SubspacesError, match="unadapt_"):
        with ss.adapters_disabled(m):
            pass
    randomize_adapters(m, std=0.05)
    adapted = logits(m, x)
    ss.fold_(m)
    torch.testing.assert_close(logits(m, x), adapted, atol=1e-5, rtol=0)


def test_pissa_refuses_conv():
    with pytest.raises(ss.SubspacesError, match="pissa"):
        one_layer(nn.Conv2d(3, 8, 3), rank=2, init="pissa")


def test_pissa_native_round_trip(tmp_path):
    base = llama_causal()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, init="pissa", targets=["q_proj", "v_proj"])
    with torch.no_grad():
        for _, layer in adapted_layers(m):
            layer.delta.B.mul_(1.5)
    adapted = logits(m, x)
    ss.save_adapter(m, tmp_path / "a")
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, x), adapted, atol=1e-5, rtol=0)
    ss.unadapt_(loaded)
    torch.testing.assert_close(logits(loaded, x), logits(base, x), atol=1e-5, rtol=0)


def test_pissa_peft_export_loads_on_the_original_base(tmp_path):
    peft = pytest.importorskip("peft")
    base = llama_causal()
    x = ids()
    m = copy.deepcopy(base)
    ss.adapt_(m, "lora", rank=4, alpha=8, init="pissa", targets="all-linear")
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=1e-2)
    m.train()
    for _ in range(3):
        m(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()
    ours = logits(m, x)
    assert (ours - logits(base, x)).abs().max() > 1e-3
    ss.save_adapter(m, tmp_path / "p", format="peft")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p").eval()
    torch.testing.assert_close(logits(pm, x), ours, atol=1e-5, rtol=0)
    # and our own importer reads it back onto the original base
    back = ss.load_adapter(copy.deepcopy(base), tmp_path / "p")
    torch.testing.assert_close(logits(back, x), ours, atol=1e-5, rtol=0)
