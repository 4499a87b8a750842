"""Dynamic logit fusion (Fan et al., NeurIPS 2024): the spec's faithful tests on tiny byte-vocabulary LLaMAs."""
from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch

from subspaces._errors import SubspacesError
from subspaces._registry import MERGE
from subspaces.merge.logit_fusion import LogitFusion, fuse_logits, fusion_objective, fusion_weights
from subspaces.models import tiny_llama


def small(seed: int, **kw) -> torch.nn.Module:
    # initializer_range 0.2: logits of order 1, so the KL terms are far from round-off
    return tiny_llama(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, seed=seed,
                      initializer_range=0.2, **kw).eval()


def large(seed: int = 0) -> torch.nn.Module:
    return tiny_llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, seed=seed,
                      initializer_range=0.2).eval()


def expert(base: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """A "fine-tuned" copy of ``base``: every weight moved by a little seeded noise."""
    m, g = copy.deepcopy(base), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return m


@pytest.fixture(scope="module")
def trio():
    s = small(1)
    return large(), s, expert(s, 11), expert(s, 12, 0.2)


def ids(batch: int = 2, length: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def last(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits[:, -1].float()


# ---------------------------------------------------------------- independent numpy reference of the paper's loss


def np_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def np_softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_loss(zl, zt, zb, w):
    """Σ_t (KL(P̃‖P) − KL(Q_t‖Q))² + (KL(P‖P̃) − KL(Q‖Q_t))² for one sequence and candidates w [C, T]: [C].
    zl [V], zt/zb [T, V]."""
    p, pt = np_softmax(zl), np_softmax(zl + w @ (zt - zb))  # [V], [C, V]
    qt, q = np_softmax(zt), np_softmax(zb)
    return sum((np_kl(pt, p) - np_kl(qt[t], q[t])) ** 2 + (np_kl(p, pt) - np_kl(q[t], qt[t])) ** 2
               for t in range(len(zt)))


def synthetic(batch=3, experts=1, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    zl = 2 * torch.randn(batch, vocab, generator=g, dtype=torch.float64)
    zb = 2 * torch.randn(batch, experts, vocab, generator=g, dtype=torch.float64)
    zt = zb + torch.randn(batch, experts, vocab, generator=g, dtype=torch.float64)
    return zl, zt, zb


# ------------------------------------------------------------------------------------------------- faithful tests


def test_fixed_weight_is_proxy_tuning(trio):
    L, S, S1, _ = trio
    x = ids()
    zl, zs, z1 = last(L, x), last(S, x), last(S1, x)
    for a in (0.7, 1.0):
        fused = LogitFusion(L, [(S1, S)], weights=a).logits(x)
        torch.testing.assert_close(fused, zl + a * (z1 - zs), rtol=0, atol=1e-5)
    torch.testing.assert_close(LogitFusion(L, [(S1, S)], weights=0.0)(x).softmax(-1), zl.softmax(-1))


def test_no_op_expert_leaves_the_large_model_unchanged(trio):
    L, S, _, _ = trio
    x = ids()
    for tuned in (S, copy.deepcopy(S)):  # the same object, and an identical copy
        fusion = LogitFusion(L, [(tuned, S)])
        torch.testing.assert_close(fusion.logits(x), last(L, x), rtol=0, atol=0)
        assert torch.equal(fusion.history[-1], torch.zeros(2, 1))  # every α ties at loss 0: the first (α = 0) wins
    zs = last(S, x)[:, None]
    assert torch.equal(fusion_objective(last(L, x), zs, zs, torch.tensor([[1.5]])), torch.zeros(2, 1))  # D₁ = 0


def test_large_equal_to_small_base_gives_alpha_one(trio):
    _, S, S1, _ = trio
    x = ids()
    fusion = LogitFusion(S, [(S1, S)])
    fused = fusion.logits(x)
    torch.testing.assert_close(fusion.history[-1], torch.ones(2, 1))
    torch.testing.assert_close(fused.softmax(-1), last(S1, x).softmax(-1), rtol=0, atol=1e-6)  # P̃ = P_{S₁}
    zs, z1 = last(S, x), last(S1, x)
    loss = fusion_objective(zs, z1[:, None], zs[:, None], torch.tensor([[0.5], [1.0], [1.5]]))
    assert loss[:, 1].max() < 1e-10 < loss[:, [0, 2]].min()  # zero loss at α = 1 only


def test_objective_matches_the_paper_formula():
    zl, zt, zb = synthetic(batch=2, experts=3, seed=1)
    cand = torch.rand(5, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    got = fusion_objective(zl, zt, zb, cand)
    want = np.stack([np_loss(zl[b].numpy(), zt[b].numpy(), zb[b].numpy(), cand.numpy()) for b in range(2)])
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_expert_weight_is_the_grid_minimiser_and_near_the_fine_optimum(seed):
    zl, zt, zb = synthetic(seed=seed)
    step = 0.01
    alpha = fusion_weights(zl, zt, zb, step=step)[:, 0].numpy()
    grid, fine = np.linspace(0, 2, 201)[:, None], np.linspace(0, 2, 20001)[:, None]
    for b in range(len(zl)):
        args = zl[b].numpy(), zt[b].numpy(), zb[b].numpy()
        assert alpha[b] == pytest.approx(grid[np_loss(*args, grid).argmin(), 0], abs=1e-12)
        assert abs(alpha[b] - fine[np_loss(*args, fine).argmin(), 0]) <= step  # within a step of the true optimum
        # discrete KKT: no better point one step to either side inside [0, 2]
        here, nbs = np_loss(*args, alpha[b:b + 1, None]), alpha[b] + np.array([[-step], [step]])
        assert (here <= np_loss(*args, nbs[(nbs >= 0) & (nbs <= 2)][:, None]) + 1e-15).all()


@pytest.mark.parametrize("search", ["one", "grid"])
def test_multi_expert_weights_match_brute_force(search):
    zl, zt, zb = synthetic(batch=3, experts=2, seed=5)
    got = fusion_weights(zl, zt, zb, step=0.1, search=search).numpy()
    grid = np.linspace(0, 2, 21)
    if search == "grid":
        cands = np.array(list(itertools.product(grid, grid)))
    else:
        zero = np.zeros_like(grid)
        cands = np.concatenate([np.stack([grid, zero], 1), np.stack([zero, grid], 1)])
    for b in range(3):
        losses = np_loss(zl[b].numpy(), zt[b].numpy(), zb[b].numpy(), cands)
        np.testing.assert_allclose(got[b], cands[losses.argmin()], atol=1e-12)
        if search == "one":
            assert (got[b] > 0).sum() <= 1  # Algorithm 1: one expert active per step


def test_bounds_and_determinism():
    zl, zt, zb = synthetic(batch=8, experts=3, seed=3)
    zt = zb + 6 * (zt - zb)  # large expert shifts push α towards the bounds
    for search in ("one", "grid"):
        w = fusion_weights(zl, zt, zb, max_weight=1.5, step=0.25, search=search)
        assert w.shape == (8, 3) and w.min() >= 0 and w.max() <= 1.5
        assert torch.equal(w, fusion_weights(zl, zt, zb, max_weight=1.5, step=0.25, search=search))


def test_vocabulary_mismatch_is_refused(trio):
    L, S, S1, _ = trio
    with pytest.raises(SubspacesError, match="vocabular"):
        LogitFusion(L, [(small(3, vocab_size=128), S)])
    with pytest.raises(SubspacesError, match="vocabular"):
        LogitFusion(tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=2, vocab_size=300), [(S1, S)])


def test_weights_are_recomputed_every_step(trio):
    zl, zt, zb = synthetic(batch=1, seed=4)
    a = fusion_weights(zl, zt, zb)
    _, zt2, _ = synthetic(batch=1, seed=6)
    b = fusion_weights(zl, zb + (zt2 - zb), zb)  # another expert shift at the "next step"
    assert not torch.equal(a, b)
    L, S, S1, S2 = trio
    fusion = LogitFusion(L, [(S1, S), (S2, S)])
    fusion.generate(ids(batch=1), 8)
    steps = torch.stack(fusion.history)  # [steps, B, T]
    assert steps.shape == (8, 1, 2) and len({tuple(s.flatten().tolist()) for s in steps}) > 1


def test_generation_with_cache_equals_without(trio):
    L, S, S1, S2 = trio
    fusion = LogitFusion(L, [(S1, S), (S2, S)])
    x = ids(batch=2, length=6)
    mask = torch.ones_like(x)
    mask[1, :2] = 0  # left padding in row 1
    cached = fusion.generate(x, 6, attention_mask=mask)
    h_cached = torch.stack(fusion.history)
    uncached = fusion.generate(x, 6, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, uncached)
    torch.testing.assert_close(h_cached, torch.stack(fusion.history))
    alone = fusion.generate(x[1:, 2:], 6)  # the padded row decodes as if it were alone
    assert torch.equal(alone[0, 4:], cached[1, 6:])


def test_bf16_on_cpu(trio):
    L, S, S1, _ = (copy.deepcopy(m).to(torch.bfloat16) for m in trio)
    x = ids()
    fused = LogitFusion(L, [(S1, S)], weights=0.5).logits(x)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, last(L, x) + 0.5 * (last(S1, x) - last(S, x)), rtol=0, atol=1e-5)
    fusion = LogitFusion(L, [(S1, S)])
    out = fusion.generate(x, 4)
    assert out.shape == (2, 10) and torch.equal(out[:, :6], x)
    w = torch.stack(fusion.history)
    assert w.dtype == torch.float32 and torch.isfinite(w).all() and 0 <= w.min() and w.max() <= 2


def test_sampling_is_reproducible_and_eos_stops(trio):
    L, S, S1, _ = trio
    fusion = LogitFusion(L, [(S1, S)])
    x = ids()
    a = fusion.generate(x, 5, do_sample=True, generator=torch.Generator().manual_seed(0))
    b = fusion.generate(x, 5, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    greedy = fusion.generate(x[:1], 5)
    eos = int(greedy[0, 6])
    stopped = fusion.generate(x[:1], 5, eos_token_id=eos)
    assert stopped.shape == (1, 7) and int(stopped[0, -1]) == eos


def test_run_registry_and_errors(trio):
    L, S, S1, _ = trio
    entry = MERGE.get("logit_fusion")
    assert entry.obj is LogitFusion and entry.obj.kind == "inference"
    fusion = LogitFusion.run(base=L, models=[(S1, S)], weights=[1.0])
    assert isinstance(fusion, LogitFusion) and fusion.pairs == [(1, 2)] and len(fusion.models) == 3
    import subspaces as ss

    assert isinstance(ss.merge("logit_fusion", base=L, models=[(S1, S)]), LogitFusion)
    with pytest.raises(SubspacesError, match="out must be None"):
        LogitFusion.run(base=L, models=[(S1, S)], out="merged/")
    with pytest.raises(SubspacesError, match="max_weight"):
        LogitFusion(L, [(S1, S)], alpha=1.0)
    with pytest.raises(SubspacesError, match="pairs"):
        LogitFusion(L, [S1])
    with pytest.raises(SubspacesError, match="2 weights for 1 experts"):
        LogitFusion(L, [(S1, S)], weights=[1.0, 2.0])
    for bad in (dict(step=0.0), dict(max_weight=-1), dict(search="joint"), dict(weights="x")):
        with pytest.raises(SubspacesError, match=next(iter(bad))):
            LogitFusion(L, [(S1, S)], **bad)
    with pytest.raises(SubspacesError, match="2\\^14"):
        fusion_weights(*synthetic(batch=1, experts=4), step=0.1, search="grid")
    zl, zt, zb = synthetic(batch=2, experts=2)
    torch.testing.assert_close(fuse_logits(zl, zt, zb, torch.tensor([0.0, 0.0])), zl)
