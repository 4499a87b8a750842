"""Concrete subspace learning: the spec's faithful tests and behaviour on a tiny model with per-task heads."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.merge._learned import Batches, entropy_grads, heads, merge_params, task_vectors
from subspaces.merge.adamerging import adamerging
from subspaces.merge.concrete import concrete, rescale, sample_mask


def toy(n_tasks: int = 2, seed: int = 0, dtype=torch.float32, batches: int = 3):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12)).to(dtype)
        hs = [nn.Linear(12, 4).to(dtype) for _ in range(n_tasks)]
    models = [{k: v + 0.5 * torch.randn(v.shape, generator=g).to(dtype) for k, v in base.state_dict().items()}
              for _ in range(n_tasks)]
    data = [[(torch.randn(8, 6, generator=g).to(dtype), torch.randint(0, 4, (8,), generator=g))
             for _ in range(batches)] for _ in range(n_tasks)]
    return base, models, hs, data


def test_sampler_limits():
    """λ → 0: a hard Bernoulli with P(m=1) = σ(x); x = 0: E[m̂] = 0.5 for any λ."""
    g = torch.Generator().manual_seed(0)
    x = {"w": torch.full((40000,), 1.0)}
    m = sample_mask(x, 1e-3, g)["w"]
    assert ((m < 1e-3) | (m > 1 - 1e-3)).float().mean() > 0.99
    assert abs((m > 0.5).float().mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01
    hard = sample_mask(x, 0.5, g, hard=True)["w"]
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    assert abs(hard.mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01
    for lam in (0.1, 0.5, 2.0):
        assert abs(sample_mask({"w": torch.zeros(40000)}, lam, g)["w"].mean().item() - 0.5) < 0.01


def test_all_ones_mask_recovers_task_arithmetic_and_adamerging():
    base, models, hs, data = toy(batches=1)  # one batch per task: both runs see the same data every step
    r = concrete(base, models, data, logits=hs, initial_logits=1e4, steps=3)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(r.state_dict[k], v + 0.3 * sum(m[k] - v for m in models))
    assert all(torch.equal(m, torch.ones_like(m)) for m in r.mask.values())
    r = concrete(base, models, data, logits=hs, inner="adamerging", granularity="task", initial_logits=1e4, steps=2,
                 adamerging_steps=6, adamerging_lr=0.05)
    a = adamerging(base, models, data, logits=hs, granularity="task", clamp=None, steps=6, lr=0.05)
    torch.testing.assert_close(r.coefficients, a.coefficients)
    for k in a.state_dict:
        torch.testing.assert_close(r.state_dict[k], a.state_dict[k])


@pytest.mark.parametrize("inner", ["task_arithmetic", "adamerging"])
def test_zero_task_vectors_give_base(inner):
    base, _, hs, data = toy()
    r = concrete(base, [base.state_dict()] * 2, data, logits=hs, inner=inner, steps=2, adamerging_steps=2)
    for k, v in base.state_dict().items():
        assert torch.equal(r.state_dict[k], v)


def test_gradient_reaches_mask_logits_only():
    base, models, hs, data = toy()
    models = [{**m, "2.bias": base.state_dict()["2.bias"]} for m in models]  # τ = 0 for one tensor
    tvs = task_vectors(base, models)
    assert not any(t.requires_grad for tv in tvs for t in tv.values())
    theta0 = {k: p.detach() for k, p in base.named_parameters()}
    x = {k: torch.zeros(v.shape, requires_grad=True) for k, v in tvs[0].items()}
    mask = rescale(sample_mask(x, 0.5, torch.Generator().manual_seed(0)))
    params = merge_params(theta0, tvs, torch.full((2,), 0.3), mask=mask)
    _, grads = entropy_grads(base, params, list(x.values()), Batches(data, 2), heads(hs, 2))
    for k, g in zip(x, grads):
        assert (g.abs().sum() > 0) == (k != "2.bias"), k
    concrete(base, models, data, logits=hs, steps=2)
    assert all(p.grad is None for p in base.parameters()) and all(h.weight.grad is None for h in hs)


def test_labels_never_read():
    base, models, hs, data = toy()
    permuted = [[(x, y.flip(0) + 2) for x, y in d] for d in data]
    a = concrete(base, models, data, logits=hs, steps=3, lr=0.1)
    b = concrete(base, models, permuted, logits=hs, steps=3, lr=0.1)
    assert a.losses == b.losses
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_mask_is_shared_by_every_task_vector():
    base, models, _, _ = toy()
    tvs = task_vectors(base, models)
    theta0 = {k: p.detach() for k, p in base.named_parameters()}
    g = torch.Generator().manual_seed(1)
    mask = {k: torch.rand(v.shape, generator=g) for k, v in tvs[0].items()}
    coef = torch.tensor([0.7, -0.2])
    got = merge_params(theta0, tvs, coef, mask=mask)
    for k in theta0:
        torch.testing.assert_close(got[k], theta0[k] + sum(c * (mask[k] * tv[k]) for c, tv in zip(coef, tvs)))


def test_entropy_goes_down_and_mask_shapes():
    base, models, hs, data = toy()
    r = concrete(base, models, data, logits=hs, steps=40, lr=0.2)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5
    assert {k: v.shape for k, v in r.mask.items()} == {k: p.shape for k, p in base.named_parameters()}
    for m in r.mask.values():  # rescaled: mean 1
        assert m.mean().item() == pytest.approx(1.0, rel=1e-4)
    r = concrete(base, models, data, logits=hs, inner="adamerging", steps=3, adamerging_steps=3,
                 eval_mask="discrete")
    assert r.coefficients.shape == (2, 4)
    assert all(len(torch.unique(m)) <= 2 for m in r.mask.values())  # {0, 1/mean}


def test_bf16_and_registry(tmp_path):
    base, models, hs, data = toy(dtype=torch.bfloat16)
    out = ss.merge("concrete", base=base, models=models, data=data, logits=hs, steps=2, out=tmp_path / "m")
    assert all(v.dtype == torch.bfloat16 for v in ss.merge.load_state_dict(out).values())
    assert (tmp_path / "m" / "merge_config.json").is_file()
    assert ss.merge.concrete.kind == "learned"
    r = concrete(base, models, data, logits=hs, inner="adamerging", steps=2, adamerging_steps=2)
    assert all(m.dtype == torch.float32 for m in r.mask.values())


@pytest.mark.parametrize("hp, word", [({"temprature": 0.5}, "temperature"), ({"inner": "ties"}, "inner"),
                                      ({"eval_mask": "hard"}, "eval_mask"), ({"temperature": 0}, "temperature")])
def test_bad_hyperparameters(hp, word):
    base, models, hs, data = toy()
    with pytest.raises(SubspacesError, match=word):
        ss.merge("concrete", base=base, models=models, data=data, logits=hs, **hp)
