"""SLTrain faithful tests (methods/optim-sltrain.md) plus setup_, bf16 on CPU, export and checkpoints."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import subspaces as ss
from subspaces._registry import TRAIN
from subspaces.models import tiny_llama
from subspaces.optim.sltrain import SLLinear, SLTrain, sltrain_


def layer(m: int = 24, n: int = 40, *, rank: int = 4, density: float = 0.1, seed: int = 0, **kw) -> SLLinear:
    return SLLinear(n, m, rank, density, generator=torch.Generator().manual_seed(seed), **kw)


def randomize_b(sl: SLLinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sl.B.copy_(torch.randn(sl.B.shape, generator=g, dtype=sl.B.dtype))


def scatter(sl: SLLinear) -> torch.Tensor:
    """Dense S from its values, built with plain differentiable ops (the reference)."""
    flat = torch.zeros(sl.out_features * sl.in_features, dtype=sl.values.dtype)
    return flat.index_put((sl.index.long(),), sl.values).view(sl.out_features, sl.in_features)


def batch(model: nn.Module, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (4, 16), generator=g)


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x, labels=x).loss


# 1. fixed support ------------------------------------------------------------------------------------------------

def test_support_is_a_fixed_buffer_not_a_parameter():
    sl = layer()
    randomize_b(sl)
    index0, values0 = sl.index.clone(), sl.values.detach().clone()
    assert "index" in dict(sl.named_buffers()) and all(p is not sl.index for p in sl.parameters())
    opt = torch.optim.AdamW(sl.parameters(), lr=1e-2)
    x = torch.randn(8, 40, generator=torch.Generator().manual_seed(0))
    for _ in range(20):
        sl(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(sl.index, index0)
    assert not torch.equal(sl.values, values0)  # the values did train


# 2. parameter count ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,rank,density", [(24, 40, 4, 0.1), (64, 128, 8, 0.03), (7, 5, 2, 0.3)])
def test_parameter_count_and_support(m, n, rank, density):
    sl = layer(m, n, rank=rank, density=density)
    config = SLTrain(rank=rank, density=density)
    assert sl.index.numel() == sl.values.numel() == math.floor(density * m * n)
    assert sum(p.numel() for p in sl.parameters()) == config.num_trainable(m, n) + m  # + bias
    assert config.num_trainable(m, n) == rank * (m + n) + int(density * m * n)
    assert sl.index.dtype == torch.int32
    assert torch.equal(sl.index, sl.index.unique())  # sorted, unique
    assert 0 <= int(sl.index.min()) and int(sl.index.max()) < m * n


def test_model_count_and_lm_head_untouched():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    dense = {n: p.numel() for n, p in model.named_parameters()}
    config = SLTrain(rank=8, density=0.05)
    names = sltrain_(model, config)
    assert len(names) == 2 * 7 and all(("attn" in n) or ("mlp" in n) for n in names)
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.model.embed_tokens, nn.Embedding)
    expected = sum(v for k, v in dense.items() if not any(t in k for t in ("attn", "mlp")))
    for name in names:
        sl = model.get_submodule(name)
        expected += config.num_trainable(sl.out_features, sl.in_features)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


# 3. init ---------------------------------------------------------------------------------------------------------

def test_init_is_the_sparse_matrix_alone():
    sl = layer(30, 50)
    assert torch.count_nonzero(sl.B) == 0
    x = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sl(x), F.linear(x, scatter(sl), sl.bias), atol=1e-6, rtol=0)
    assert sl.values.abs().max() <= 1 / math.sqrt(50)
    assert sl.A.abs().max() <= 1 / math.sqrt(50)  # Kaiming-uniform(a=√5): bound 1/√fan_in
    assert sl.bias.abs().max() <= 1 / math.sqrt(30)  # the official code's 1/√out_features
    assert sl.values.std() > 0.5 / math.sqrt(3 * 50)  # spread over the interval, not degenerate


def test_seeded_and_distinct_per_layer():
    a, b = tiny_llama(hidden_size=64, intermediate_size=128), tiny_llama(hidden_size=64, intermediate_size=128)
    sltrain_(a, SLTrain(rank=8, seed=3))
    sltrain_(b, SLTrain(rank=8, seed=3))
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    q, k = a.model.layers[0].self_attn.q_proj, a.model.layers[1].self_attn.q_proj
    assert not torch.equal(q.index, k.index)
    c = tiny_llama(hidden_size=64, intermediate_size=128)
    sltrain_(c, SLTrain(rank=8, seed=4))
    assert not torch.equal(c.model.layers[0].self_attn.q_proj.index, q.index)


# 4. forward / backward equivalence with the dense reference ------------------------------------------------------

@pytest.mark.parametrize("trainable_scaling", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_backward_match_dense_reference(trainable_scaling, bias):
    sl = layer(24, 40, trainable_scaling=trainable_scaling, bias=bias)
    randomize_b(sl)
    x = torch.randn(2, 5, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
    gy = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3))
    out = sl(x)
    (out * gy).sum().backward()
    ours = {n: p.grad.clone() for n, p in sl.named_parameters()}
    gx = x.grad.clone()

    sl.zero_grad()
    x.grad = None
    W = sl.scale * (sl.B @ sl.A) + scatter(sl)  # the reference: dense W and F.linear
    W.retain_grad()
    ref = F.linear(x, W, sl.bias)
    (ref * gy).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    assert set(ours) == {n for n, _ in sl.named_parameters()}
    for n, p in sl.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, atol=1e-5, rtol=1e-5, msg=n)
    torch.testing.assert_close(ours["values"], W.grad.reshape(-1)[sl.index.long()], atol=1e-5, rtol=1e-5)


def test_input_only_gradient_and_frozen_factors():
    sl = layer()
    randomize_b(sl)
    for p in sl.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 40, requires_grad=True)
    sl(x).sum().backward()
    torch.testing.assert_close(x.grad, sl.weight.sum(0).expand(3, -1), atol=1e-5, rtol=1e-5)


# 5. scaling ------------------------------------------------------------------------------------------------------

def test_doubling_alpha_doubles_the_low_rank_part_exactly():
    one, two = layer(alpha=8.0, bias=False), layer(alpha=16.0, bias=False)
    for sl in (one, two):
        randomize_b(sl)
    assert one.scale == 2.0 and two.scale == 4.0
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    sparse_only = F.linear(x, scatter(one))
    torch.testing.assert_close(two(x) - sparse_only, 2 * (one(x) - sparse_only), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        one.values.zero_()
        two.values.zero_()
    assert torch.equal(two(x), 2 * one(x))  # a power-of-two scale is exact in floating point


def test_trainable_scaling_is_tanh_of_theta_from_one():
    sl = layer(trainable_scaling=True)
    assert isinstance(sl.scaling, nn.Parameter) and sl.scaling.item() == 1.0
    assert torch.equal(sl.scale, torch.tanh(torch.ones(1)))
    assert any(p is sl.scaling for p in sl.parameters())
    randomize_b(sl)
    sl(torch.randn(2, 40)).sum().backward()
    assert sl.scaling.grad is not None and sl.scaling.grad.abs().item() > 0


# export, dtype, setup_, checkpoints ------------------------------------------------------------------------------

def test_to_linear_has_identical_outputs():
    sl = layer()
    randomize_b(sl)
    x = torch.randn(4, 40)
    lin = sl.to_linear()
    assert type(lin) is nn.Linear
    with torch.no_grad():
        assert torch.equal(lin(x), sl(x))


def test_bf16_forward_backward_on_cpu():
    ref = layer(bias=True)
    randomize_b(ref)
    sl = layer(bias=True, dtype=torch.bfloat16)
    randomize_b(sl)
    assert sl.A.dtype == sl.values.dtype == torch.bfloat16 and sl.index.dtype == torch.int32
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(0))
    out = sl(x.bfloat16())
    out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16
    assert all(p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all() for p in sl.parameters())
    expected = ref(x)  # bf16 keeps ~3 significant digits of every weight and input: compare relative norms
    assert ((out.float() - expected).norm() / expected.norm()).item() < 0.03
    ref.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 master weights under autocast
        out = ref(x)
    out.float().pow(2).sum().backward()
    assert out.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in ref.parameters())


def test_setup_trains_a_tiny_llama():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    opt = ss.optim.setup_(model, "sltrain", lr=1e-3, rank=8)
    assert isinstance(opt, torch.optim.AdamW)
    assert isinstance(model.model.layers[0].mlp.up_proj, SLLinear)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    x = batch(model)
    losses = []
    for _ in range(8):
        loss = loss_of(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_checkpoint_carries_the_support(tmp_path):
    a = tiny_llama(hidden_size=64, intermediate_size=128)
    sltrain_(a, SLTrain(rank=8, seed=1))
    b = tiny_llama(hidden_size=64, intermediate_size=128)
    sltrain_(b, SLTrain(rank=8, seed=2))
    torch.save(a.state_dict(), tmp_path / "sd.pt")
    b.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    x = batch(a)
    with torch.no_grad():
        assert torch.equal(a(input_ids=x).logits, b(input_ids=x).logits)


def test_no_match_is_a_clear_error():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    with pytest.raises(ss.SubspacesError, match="q_proj"):
        sltrain_(model, SLTrain(rank=8, targets=("nothing",)))


def test_config_contract_and_validation():
    entry = TRAIN.get("sltrain")
    assert entry.obj is SLTrain and entry.paper.startswith("https://arxiv.org/abs/2406.02214")
    c = SLTrain()
    assert (c.rank, c.density, c.alpha, c.trainable_scaling, c.seed) == (128, 0.03, 32.0, False, 0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rank = 3
    with pytest.raises(TypeError):
        SLTrain(8)
    assert SLTrain(targets=["attn"]).targets == ("attn",)
    for bad in ({"rank": 0}, {"rank": 2.0}, {"density": 0.0}, {"density": 1.0}, {"alpha": 0}, {"targets": "attn"},
                {"targets": ()}, {"seed": 1.5}, {"trainable_scaling": 1}):
        field = next(iter(bad))
        with pytest.raises(ss.SubspacesError, match=field):
            SLTrain(**bad)
    with pytest.raises(ss.SubspacesError, match="density"):
        SLLinear(3, 3, 1, 0.05)  # ⌊0.05·9⌋ = 0 entries
