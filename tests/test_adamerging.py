"""AdaMerging (task-wise and layer-wise) and the shared learned-merge machinery (_learned)."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.merge._learned import Batches, entropy_grads, entropy_loss, heads, merge_params, task_vectors
from subspaces.merge.adamerging import adamerging


def toy(n_tasks: int = 2, seed: int = 0, scale: float = 0.5, dtype=torch.float32):
    """A shared MLP backbone θ0, fine-tuned copies (state dicts), one linear head per task, unlabelled batches."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12)).to(dtype)
        hs = [nn.Linear(12, 4).to(dtype) for _ in range(n_tasks)]
    models = [{k: v + scale * torch.randn(v.shape, generator=g).to(dtype) for k, v in base.state_dict().items()}
              for _ in range(n_tasks)]
    data = [[(torch.randn(8, 6, generator=g).to(dtype), torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
            for _ in range(n_tasks)]
    return base, models, hs, data


def test_init_is_task_arithmetic_and_shapes():
    base, models, hs, data = toy()
    for gran, shape in (("task", (2,)), ("layer", (2, 4))):
        r = adamerging(base, models, data, logits=hs, granularity=gran, steps=0)
        assert tuple(r.coefficients.shape) == shape and torch.all(r.coefficients == 0.3)
        for k, v in base.state_dict().items():
            want = v + 0.3 * sum(m[k] - v for m in models)
            torch.testing.assert_close(r.state_dict[k], want)


def test_entropy_goes_down_and_coefficients_stay_clamped():
    base, models, hs, data = toy()
    for gran in ("task", "layer"):
        r = adamerging(base, models, data, logits=hs, granularity=gran, steps=40, lr=0.05)
        assert sum(r.losses[-5:]) / 5 < r.losses[0] - 1e-3
        assert r.coefficients.min() >= 0 and r.coefficients.max() <= 1
    r = adamerging(base, models, data, logits=hs, steps=30, lr=1.0, clamp=(0.1, 0.6))
    assert r.coefficients.min() >= 0.1 and r.coefficients.max() <= 0.6


def test_zero_task_vectors_give_base_and_heads_untouched():
    base, _, hs, data = toy()
    before = [h.weight.detach().clone() for h in hs]
    r = adamerging(base, [base.state_dict(), dict(base.state_dict())], data, logits=hs, steps=5, lr=0.1)
    for k, v in base.state_dict().items():
        assert torch.equal(r.state_dict[k], v)
    assert all(torch.equal(h.weight, b) and h.weight.grad is None for h, b in zip(hs, before))
    assert all(p.grad is None for p in base.parameters())
    assert set(r.state_dict) == set(base.state_dict())  # heads are not merged


def test_gradient_identity():
    """∂L/∂λ_{t,b} = <∇_{θ_b} L, τ_{t,b}>: the coefficients see the task vectors through the merged weights."""
    base, models, hs, data = toy()
    tvs = task_vectors(base, models)
    theta0 = {k: p.detach() for k, p in base.named_parameters()}
    lam = torch.rand(2, 4).requires_grad_()
    _, (g,) = entropy_grads(base, merge_params(theta0, tvs, lam), [lam], Batches(data, 2), heads(hs, 2))
    params = {k: v.detach().requires_grad_() for k, v in merge_params(theta0, tvs, lam).items()}
    _, gp = entropy_grads(base, params, list(params.values()), Batches(data, 2), heads(hs, 2))
    for b, (k, gk) in enumerate(zip(params, gp)):
        for t in range(2):
            torch.testing.assert_close(g[t, b], (gk * tvs[t][k]).sum(), rtol=1e-4, atol=1e-6)


def test_labels_never_read():
    base, models, hs, data = toy()
    permuted = [[(x, y.flip(0) + 1) for x, y in d] for d in data]
    a = adamerging(base, models, data, logits=hs, steps=4, lr=0.1)
    b = adamerging(base, models, permuted, logits=hs, steps=4, lr=0.1)
    assert a.losses == b.losses and torch.equal(a.coefficients, b.coefficients)


def test_bf16_state_dicts_on_cpu():
    base, models, hs, data = toy(dtype=torch.bfloat16)
    r = adamerging(base, models, data, logits=hs, granularity="task", steps=3, lr=0.1)
    assert all(v.dtype == torch.bfloat16 for v in r.state_dict.values())
    assert r.coefficients.dtype == torch.float32 and torch.isfinite(torch.tensor(r.losses)).all()


def test_registry_run_dicts_and_out(tmp_path):
    base, models, hs, data = toy()
    names = ["a", "b"]
    sd = ss.merge("adamerging", base=base, models=dict(zip(names, models)), data=dict(zip(names, data)),
                  logits=dict(zip(names[::-1], hs[::-1])), steps=2, granularity="task", out=tmp_path / "m")
    assert sd == tmp_path / "m" and set(ss.merge.load_state_dict(sd)) == set(base.state_dict())
    cfg = json.loads((tmp_path / "m" / "merge_config.json").read_text())
    assert cfg["method"] == "adamerging" and len(cfg["coefficients"]) == 2
    assert (tmp_path / "m" / "model.safetensors").is_file()
    entry = [e for e in ss.list_methods() if e["name"] == "adamerging"][0]
    assert entry["family"] == "merge" and ss.merge.adamerging.kind == "learned"


@pytest.mark.parametrize("hp, word", [({"stepz": 3}, "steps"), ({"granularity": "block"}, "granularity"),
                                      ({"clamp": (1, 0)}, "clamp"), ({"lr": 0}, "lr")])
def test_bad_hyperparameters(hp, word):
    base, models, hs, data = toy()
    with pytest.raises(SubspacesError, match=word):
        ss.merge("adamerging", base=base, models=models, data=data, logits=hs, **hp)


def test_bad_inputs():
    base, models, hs, data = toy()
    with pytest.raises(SubspacesError, match="data"):
        ss.merge("adamerging", base=base, models=models, logits=hs)
    with pytest.raises(SubspacesError, match="data"):
        adamerging(base, models, data[:1], logits=hs)
    with pytest.raises(SubspacesError, match="nn.Module"):
        adamerging(base.state_dict(), models, data, logits=hs)
    with pytest.raises(SubspacesError, match="lacks"):
        adamerging(base, [{"x": torch.zeros(1)}] * 2, data, logits=hs)


def test_tiny_bert_backbone_with_per_task_heads_and_tied_weights():
    """A Hugging Face backbone shared, dict batches with labels, each task's head on mean-pooled states."""
    from subspaces.models import tiny_bert

    backbone = tiny_bert(hidden_size=16, num_hidden_layers=1, vocab_size=50).bert
    g = torch.Generator().manual_seed(0)
    models = [{k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in backbone.state_dict().items()} for _ in range(2)]
    hs = [nn.Linear(16, 3) for _ in range(2)]

    def head(h):
        def logits(out, x):
            m = x["attention_mask"][..., None].float()
            return h((out.last_hidden_state * m).sum(1) / m.sum(1))
        return logits

    def batch():
        mask = torch.ones(4, 7, dtype=torch.long)
        mask[0, 4:] = 0
        return {"input_ids": torch.randint(1, 50, (4, 7), generator=g), "attention_mask": mask,
                "labels": torch.zeros(4, dtype=torch.long)}

    data = [[batch() for _ in range(2)] for _ in range(2)]
    r = adamerging(backbone, models, data, logits=[head(h) for h in hs], steps=3, lr=0.1)
    assert set(r.state_dict) == set(backbone.state_dict()) and r.coefficients.shape[0] == 2
    assert entropy_loss(torch.zeros(3, 5)).item() == pytest.approx(torch.log(torch.tensor(5.0)).item())

    class Tied(nn.Module):  # lm_head shares the embedding: merged once, written under both names
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.emb(ids).mean(1))

    tied = Tied()
    ft = {k: v + 0.1 for k, v in tied.state_dict().items()}
    r = adamerging(tied, [ft], [[torch.randint(0, 10, (3, 4), generator=g)]], steps=2, lr=0.1)
    assert torch.equal(r.state_dict["emb.weight"], r.state_dict["out.weight"])
    assert not torch.equal(r.state_dict["emb.weight"], tied.emb.weight)
