"""aTLAS (learned anisotropic scaling of task vectors): the spec's faithful tests and toy-problem checks."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.func import functional_call

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.merge.atlas import ATLAS, atlas, compose, few_shot

D, C = 8, 3


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, C)).eval()


def toy(task: int, n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 0: the label is the argmax of features 0..2; task 1: of features 3..5."""
    x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed + 10 * task))
    return x, x[:, 3 * task:3 * task + 3].argmax(-1)


def finetune(base: nn.Module, task: int) -> nn.Module:
    m = copy.deepcopy(base).train()
    x, y = toy(task, seed=99)
    opt = torch.optim.Adam(m.parameters(), lr=3e-2)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return m.eval()


@pytest.fixture(scope="module")
def setup():
    base = mlp()
    fts = [finetune(base, 0), finetune(base, 1)]
    theta0 = base.state_dict()
    tvs = [{k: v - theta0[k] for k, v in ft.state_dict().items()} for ft in fts]
    return base, fts, tvs


def accuracy(model: nn.Module, sd: dict, task: int) -> float:
    x, y = toy(task, seed=7)
    with torch.no_grad():
        return (functional_call(model, sd, (x,)).argmax(-1) == y).float().mean().item()


def test_zero_coefficients_is_the_base(setup):  # faithful 1
    base, _, tvs = setup
    comp = compose(base, tvs)
    x = toy(0)[0]
    with torch.no_grad():
        assert torch.equal(functional_call(base, comp.params(torch.zeros(2, len(comp.names))), (x,)), base(x))
    zero = [{k: torch.zeros_like(v) for k, v in tv.items()} for tv in tvs]
    res = atlas(base, zero, few_shot(*toy(0), 4), epochs=2)
    assert all(torch.equal(res.state_dict[k], v) for k, v in base.state_dict().items())


def test_coefficient_counts_and_frozen(setup):  # faithful 2
    base, _, tvs = setup
    before = {k: v.clone() for k, v in base.state_dict().items()}
    data = few_shot(*toy(0), 2, batch_size=8)
    p = len(list(base.parameters()))  # every tensor is a block: weights, biases, LayerNorm
    assert atlas(base, tvs, data, epochs=1).coefficients.shape == (2, p)
    assert atlas(base, tvs, data, epochs=1, blockwise=False).coefficients.shape == (2,)
    res = atlas(base, tvs, data, epochs=1, partitions=5)
    assert res.coefficients.shape == (2, p, 5) and res.blocks == [k for k, _ in base.named_parameters()]
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())  # θ0 untouched
    assert all(q.grad is None for q in base.parameters())
    assert not any(t.requires_grad for tv in tvs for t in tv.values())


def test_gradient_identity(setup):  # faithful 3: ∂L/∂λ_{t,b} = <∇_{θ_b} L, τ_{t,b}>
    base, _, tvs = setup
    comp = compose(base, tvs)
    x, y = toy(0)
    lam = (0.3 * torch.randn(2, len(comp.names))).requires_grad_()
    nn.functional.cross_entropy(functional_call(base, comp.params(lam), (x,)), y).backward()
    theta = {k: v.detach().requires_grad_() for k, v in comp.params(lam.detach()).items() if k in comp.names}
    nn.functional.cross_entropy(functional_call(base, theta, (x,)), y).backward()
    expect = torch.tensor([[(theta[k].grad * tv[k]).sum().item() for k in comp.names] for tv in tvs])
    torch.testing.assert_close(lam.grad, expect, rtol=1e-4, atol=1e-6)


def test_partition_masks(setup):  # faithful 4
    base, _, tvs = setup
    k = 4
    comp = compose(base, tvs, partitions=k, seed=3)
    for name, mask in zip(comp.names, comp.masks):
        onehot = nn.functional.one_hot(mask.long(), k).movedim(-1, 0)
        assert torch.equal(onehot.sum(0), torch.ones_like(mask, dtype=torch.long)), name
    shared = {}
    for name, mask in zip(comp.names, comp.masks):  # one mask per distinct shape, as the official code
        assert torch.equal(shared.setdefault(tuple(mask.shape), mask), mask)
    lam = torch.randn(2, len(comp.names))  # equal λ over the K parts = the blockwise composition
    full, block = comp.params(lam[:, :, None].expand(-1, -1, k)), comp.params(lam)
    assert all(torch.allclose(full[n], block[n], atol=1e-6) for n in comp.names)


def test_merged_weights_reproduce_the_composition(setup):  # faithful 5
    base, _, tvs = setup
    res = atlas(base, tvs, few_shot(*toy(0), 8), epochs=3, partitions=3)
    plain = copy.deepcopy(base)
    plain.load_state_dict(res.state_dict)
    comp = compose(base, tvs, partitions=3)
    x = toy(1)[0]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), functional_call(base, comp.params(res.coefficients), (x,)))


def test_one_task_coefficient_one_is_theta1(setup):
    base, fts, tvs = setup
    comp = compose(base, tvs[:1])
    params = comp.params(torch.ones(1, len(comp.names)))
    for k, v in fts[0].state_dict().items():
        torch.testing.assert_close(params[k], v, atol=1e-6, rtol=0)


def test_labelled_few_shot_learns_the_right_task(setup):
    base, _, tvs = setup
    res = atlas(base, tvs, few_shot(*toy(0), 8, batch_size=8), epochs=10)
    assert res.losses[-1] < res.losses[0]
    assert accuracy(base, res.state_dict, 0) > max(0.85, accuracy(base, base.state_dict(), 0) + 0.3)
    assert res.coefficients[0].mean() > res.coefficients[1].mean() + 0.2  # task 0's vector is the useful one


def test_unlabelled_entropy_mode_lowers_entropy(setup):
    from subspaces.merge._learned import entropy_loss

    base, _, tvs = setup
    x = toy(1, seed=5)[0]
    res = atlas(base, tvs, list(x.split(32)), objective="entropy", epochs=5)
    with torch.no_grad():
        h0, h1 = (entropy_loss(functional_call(base, sd, (x,))).item() for sd in (base.state_dict(), res.state_dict))
    assert res.losses[-1] < res.losses[0] and h1 < h0 - 0.05


def test_task_heads_and_validation(setup):
    base, _, tvs = setup
    data = {"a": few_shot(*toy(0), 8), "b": few_shot(*toy(1), 8)}
    val = {"a": [toy(0, seed=7)], "b": [toy(1, seed=7)]}
    heads = {"a": lambda out: out, "b": lambda out, inputs: out}  # f(output) or f(output, inputs)
    res = atlas(base, tvs, data, logits=heads, val=val, epochs=5)
    assert res.best > (accuracy(base, base.state_dict(), 0) + accuracy(base, base.state_dict(), 1)) / 2
    with pytest.raises(SubspacesError, match="no head for task"):
        atlas(base, tvs, data, logits={"a": heads["a"]}, epochs=1)


def test_bf16_on_cpu(setup):
    base, fts, tvs = setup
    b16 = copy.deepcopy(base).to(torch.bfloat16)
    tv16 = [{k: v.to(torch.bfloat16) for k, v in tv.items()} for tv in tvs]
    x, y = toy(0)
    res = atlas(b16, tv16, [(x[:64].bfloat16(), y[:64])], epochs=2)
    assert all(v.dtype == torch.bfloat16 for v in res.state_dict.values())
    assert res.coefficients.dtype == torch.float32 and torch.isfinite(torch.tensor(res.losses)).all()
    comp = compose(b16, tv16)
    assert all(torch.equal(comp.params(torch.zeros(2, len(comp.names)))[k], v) for k, v in b16.state_dict().items())


def test_few_shot_k_per_class():
    x, y = toy(0)
    batches = few_shot(x, y, 4, batch_size=5, seed=1)
    labels = torch.cat([b[1] for b in batches])
    assert torch.equal(labels.bincount(), torch.full((C,), 4))
    assert len(few_shot(x, y, 4, batch_size=5, min_batches=10)) >= 10  # oversampled, as the official script
    xs = torch.cat([b[0] for b in batches])
    assert all(any(torch.equal(r, s) for s in x) for r in xs[:3])


def test_errors(setup):
    base, _, tvs = setup
    data = few_shot(*toy(0), 2)
    with pytest.raises(SubspacesError, match="unknown hyperparameter 'lrate'.*lr"):
        atlas(base, tvs, data, lrate=0.1)
    with pytest.raises(SubspacesError, match="objective"):
        ATLAS(objective="mse")
    with pytest.raises(SubspacesError, match="blockwise"):
        ATLAS(blockwise=False, partitions=4)
    with pytest.raises(SubspacesError, match="labelled"):
        atlas(base, tvs, [toy(0)[0]], epochs=1)
    with pytest.raises(SubspacesError, match="unknown hyperparameter"):
        ss.merge("atlas", base=base, models=[], data=data, bogus=1)


def test_run_through_merge(setup, tmp_path):
    base, fts, _ = setup
    sd = ss.merge("atlas", base=base, models=[f.state_dict() for f in fts], data=few_shot(*toy(0), 8), epochs=5)
    assert accuracy(base, sd, 0) > accuracy(base, base.state_dict(), 0) + 0.3
    out = ss.merge("atlas", base=base, models=[f.state_dict() for f in fts], data=few_shot(*toy(0), 8), epochs=1,
                   out=tmp_path / "m")
    assert out == tmp_path / "m" and set(ss.merge.load_state_dict(out)) == set(base.state_dict())
    cfg = json.loads((tmp_path / "m" / "merge_config.json").read_text())
    assert cfg["method"] == "atlas" and len(cfg["coefficients"]) == 2 and len(cfg["blocks"]) == 6
