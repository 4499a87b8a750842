"""Restarts faithful tests (methods/optim-restarts-refactor-momentum-reset.md) plus the wrapper's contract."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._registry import TRAIN
from subspaces.models import tiny_llama
from subspaces.optim._state import state_bytes
from subspaces.optim.restarts import (Restarts, RestartsOptimizer, balanced_factors, factors, lowrank_, refactor_,
                                      reset_moments_)
from subspaces.optim.sltrain import SLLinear, SLTrain, sltrain_

MOMENTS = ("exp_avg", "exp_avg_sq")


def model() -> nn.Module:
    return tiny_llama(hidden_size=64, intermediate_size=128)


def batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(seed))


def train(m: nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0) -> list[float]:
    losses = []
    for i in range(start, start + steps):
        x = batch(i)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def logits(m: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m(input_ids=batch(99)).logits


def layers_of(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if factors(x) is not None]


def assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb), ka


# 1-2. refactorization preserves the function and balances the factors -------------------------------------------

@pytest.mark.parametrize("base", ["lowrank", "sltrain"])
def test_refactor_preserves_function_and_balances(base):
    m = model()
    opt = ss.optim.setup_(m, Restarts(base=base, rank=8, update_every=None, reset_every=None), lr=1e-2)
    train(m, opt, 4)  # B and A drift apart (SLTrain's B leaves zero)
    before = logits(m)
    products = [(f[0] @ f[1]).detach().clone() for f in map(factors, layers_of(m))]
    params = [id(p) for p in m.parameters()]
    assert refactor_(m) == 14
    assert [id(p) for p in m.parameters()] == params  # in place: the optimizer keeps its Parameters
    torch.testing.assert_close(logits(m), before, atol=1e-5, rtol=1e-4)
    for layer, P in zip(layers_of(m), products):
        B, A = factors(layer)
        torch.testing.assert_close(B @ A, P, atol=1e-6, rtol=1e-4)
        S = torch.linalg.svdvals(P.double())[: B.shape[1]].float()
        torch.testing.assert_close(B.T @ B, torch.diag(S), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(A @ A.T, torch.diag(S), atol=1e-5, rtol=1e-4)


def test_refactor_keeps_the_sltrain_scale_and_sparse_part():
    sl = SLLinear(40, 24, 4, 0.1, alpha=8.0, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sl.B.copy_(torch.randn(24, 4) * 3)
    W, values = sl.weight.detach().clone(), sl.values.detach().clone()
    container = nn.Sequential(sl)
    assert refactor_(container) == 1
    assert sl.scale == 2.0 and torch.equal(sl.values, values)
    torch.testing.assert_close(sl.weight, W, atol=1e-5, rtol=1e-5)


# 3. QR-core path equals the naive SVD ----------------------------------------------------------------------------

def test_qr_core_equals_naive_svd():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(30, 5, generator=g, dtype=torch.float64) * torch.tensor([4.0, 1, 0.3, 2, 0.1], dtype=torch.float64)
    A = torch.randn(5, 50, generator=g, dtype=torch.float64) * 0.2
    Bq, Aq, S = balanced_factors(B, A)
    U, Sn, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    torch.testing.assert_close(S, Sn[:5], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(Bq @ Aq, B @ A, atol=1e-10, rtol=1e-10)
    signs = torch.sign((Bq * (U[:, :5] * Sn[:5].sqrt())).sum(0))  # singular vectors are unique up to sign
    torch.testing.assert_close(Bq, U[:, :5] * Sn[:5].sqrt() * signs, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(Aq, (Sn[:5].sqrt()[:, None] * Vh[:5]) * signs[:, None], atol=1e-10, rtol=1e-10)


def test_refactor_skips_layers_without_a_bottleneck_or_with_zero_product():
    m = model()
    sltrain_(m, SLTrain(rank=8))  # B = 0 at init
    assert refactor_(m) == 0
    wide = nn.Sequential(ss.nn.LowRankLinear(4, 6, rank=5))
    w = wide[0].weight.detach().clone()
    assert refactor_(wide) == 0 and torch.equal(wide[0].weight, w)


# 4. momentum reset -----------------------------------------------------------------------------------------------

def test_reset_zeroes_moments_and_next_update_is_a_fresh_adam_step():
    m = model()
    opt = Restarts(base="lowrank", rank=8, update_every=None, reset_every=3).setup(m, lr=1e-2)
    train(m, opt, 3)
    assert opt.state and all(float(s["step"]) == 0 for s in opt.state.values())
    assert all(torch.count_nonzero(s[k]) == 0 for s in opt.state.values() for k in MOMENTS)
    twin = copy.deepcopy(m)
    fresh = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.0)
    train(m, opt, 1, start=3)
    train(twin, fresh, 1, start=3)
    assert_same_params(m, twin)


def test_reset_flags():
    p = nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, amsgrad=True)
    p.grad = torch.ones(3)
    opt.step()
    reset_moments_(opt, second_moment=False, step_counter=False)
    s = opt.state[p]
    assert torch.count_nonzero(s["exp_avg"]) == 0 and float(s["step"]) == 1
    assert torch.count_nonzero(s["exp_avg_sq"]) == 3 and torch.count_nonzero(s["max_exp_avg_sq"]) == 3
    reset_moments_(opt)
    assert float(s["step"]) == 0 and torch.count_nonzero(s["exp_avg_sq"]) == 0
    assert torch.count_nonzero(s["max_exp_avg_sq"]) == 0


def test_refactor_step_resets_only_the_factors_when_reset_is_off():
    m = model()
    opt = Restarts(base="lowrank", rank=8, update_every=2, reset_every=None).setup(m, lr=1e-2)
    B, A = factors(m.model.layers[0].self_attn.q_proj)
    train(m, opt, 2)
    torch.testing.assert_close(B.T @ B, A @ A.T, atol=1e-5, rtol=1e-4)  # refactored at step 2
    for p in (B, A):
        assert float(opt.state[p]["step"]) == 0 and torch.count_nonzero(opt.state[p]["exp_avg"]) == 0
    emb = opt.state[m.model.embed_tokens.weight]
    assert float(emb["step"]) == 2 and torch.count_nonzero(emb["exp_avg"]) > 0


# 5. disabled reproduces the plain trajectory bit for bit ---------------------------------------------------------

def test_disabled_reproduces_plain_sltrain():
    a, b = model(), model()
    opt_a = Restarts(base="sltrain", rank=8, alpha=16.0, density=0.05, update_every=None, reset_every=None,
                     seed=5).setup(a, lr=1e-2)
    opt_b = SLTrain(rank=8, alpha=16.0, density=0.05, seed=5).setup(b, lr=1e-2)
    train(a, opt_a, 5)
    train(b, opt_b, 5)
    assert_same_params(a, b)


def test_disabled_reproduces_plain_lowrank_and_enabled_differs():
    a, b, c = model(), model(), model()
    opt_a = Restarts(base="lowrank", rank=8, update_every=None, reset_every=None).setup(a, lr=1e-2)
    lowrank_(b, rank=8, targets=("attn", "mlp"))
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0)
    opt_c = Restarts(base="lowrank", rank=8, update_every=2, reset_every=2).setup(c, lr=1e-2)
    train(a, opt_a, 5)
    train(b, opt_b, 5)
    train(c, opt_c, 5)
    assert_same_params(a, b)
    assert not torch.equal(logits(a), logits(c))


def test_lowrank_init_has_linear_variance():
    m = tiny_llama(hidden_size=256, intermediate_size=512)
    lowrank_(m, rank=32, targets=("mlp",))
    W = m.model.layers[0].mlp.up_proj.weight.detach()  # (512, 256)
    assert abs(W.var().item() * 3 * 256 - 1) < 0.1


# the wrapper: schedulers, checkpoints, validation ----------------------------------------------------------------

def test_wrapper_shares_groups_and_state_and_works_with_a_scheduler():
    m = model()
    opt = ss.optim.setup_(m, "restarts", lr=1e-2, rank=8, update_every=3, reset_every=3)
    assert isinstance(opt, RestartsOptimizer) and isinstance(opt.inner, torch.optim.AdamW)
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    losses = []
    for i in range(6):
        losses += train(m, opt, 1, start=i)
        sched.step()
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 6)
    assert losses[-1] < losses[0]
    assert state_bytes(opt) == state_bytes(opt.inner) > 0


def test_state_dict_round_trip_resumes_the_same_restarts(tmp_path):
    config = Restarts(base="sltrain", rank=8, update_every=3, reset_every=4)
    a = model()
    opt_a = config.setup(a, lr=1e-2)
    train(a, opt_a, 5)
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, tmp_path / "ckpt.pt")
    train(a, opt_a, 5, start=5)  # crosses refactors at 6, 9 and resets at 8

    b = model()
    opt_b = config.setup(b, lr=1e-2)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.steps == 5
    assert opt_b.param_groups is opt_b.inner.param_groups and opt_b.state is opt_b.inner.state
    train(b, opt_b, 5, start=5)
    assert_same_params(a, b)
    with pytest.raises(ss.SubspacesError, match="RestartsOptimizer state dict"):
        opt_b.load_state_dict(opt_b.inner.state_dict())


def test_config_contract_and_validation():
    entry = TRAIN.get("restarts")
    assert entry.obj is Restarts and entry.paper == "https://arxiv.org/abs/2505.22922"
    c = Restarts()
    assert (c.base, c.rank, c.update_every, c.reset_every, c.reset_second_moment) == ("lowrank", 128, 200, 200, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.rank = 3
    for bad in ({"base": "galore"}, {"rank": 0}, {"update_every": 0}, {"reset_every": 1.5}, {"density": 2.0},
                {"alpha": -1.0}, {"reset_step_counter": None}, {"targets": "mlp"}):
        with pytest.raises(ss.SubspacesError, match=next(iter(bad))):
            Restarts(**bad)
    with pytest.raises(ss.SubspacesError, match="q_proj"):
        Restarts(rank=8, targets=("nothing",)).setup(model(), lr=1e-3)
