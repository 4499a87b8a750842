"""Faithful tests of the tensor-wise merges (shared/methods/merge-task-arithmetic-ties-dare.md) and the conformance
contract every registered "tensor" method meets."""
from __future__ import annotations

import pytest
import torch

import subspaces as ss
import subspaces.merge  # noqa: F401  (importing registers the methods)
from subspaces._errors import SubspacesError
from subspaces._registry import MERGE

TENSOR = [e.name for e in MERGE.entries() if getattr(e.obj, "kind", None) == "tensor"]
RANDOM = {"dare_linear", "dare_ties"}


def state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": scale * torch.randn(6, 5, generator=g), "layer.bias": scale * torch.randn(6, generator=g),
            "ids": torch.arange(4)}


def finetuned(base, seed: int, scale: float = 0.1):
    noise = state(seed, scale)
    return {k: (v + noise[k]).to(v.dtype) if v.is_floating_point() else v.clone() for k, v in base.items()}


def test_tensor_methods_registered():
    assert set(TENSOR) >= {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                           "model_stock"}


@pytest.mark.parametrize("method", TENSOR)
def test_conformance_zero_task_vectors_give_base(method):
    base = state(0)
    models = [{k: v.clone() for k, v in base.items()} for _ in range(3)]
    out = ss.merge(method, base=base, models=models)
    for k in base:
        assert torch.equal(out[k], base[k]), k


@pytest.mark.parametrize("method", TENSOR)
def test_conformance_bf16_in_bf16_out_and_inputs_untouched(method):
    base = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state(0).items()}
    models = [finetuned(base, s) for s in (1, 2, 3)]
    copies = [{k: v.clone() for k, v in m.items()} for m in models]
    out = ss.merge(method, base=base, models=models)
    assert out["layer.weight"].dtype == torch.bfloat16 and out["ids"].dtype == torch.int64
    assert torch.isfinite(out["layer.weight"].float()).all()
    assert all(torch.equal(m[k], c[k]) for m, c in zip(models, copies) for k in m)


@pytest.mark.parametrize("method", TENSOR)
def test_conformance_paper_and_schema(method):
    entry = MERGE.get(method)
    assert entry.paper.startswith("https://arxiv.org/abs/")
    module = __import__(entry.obj.__module__, fromlist=["_"])
    assert entry.paper in module.__doc__
    with pytest.raises(SubspacesError, match="unknown hyperparameter 'bogus'"):
        ss.merge(method, base=state(0), models=[finetuned(state(0), 1), finetuned(state(0), 2)], bogus=1)


@pytest.mark.parametrize("method", sorted(set(TENSOR) - RANDOM))
def test_conformance_order_of_models_does_not_matter(method):
    base = state(0)
    models = [finetuned(base, s) for s in (1, 2, 3)]
    a = ss.merge(method, base=base, models=models)
    b = ss.merge(method, base=base, models=models[::-1])
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_single_task_identity():
    """Spec 2: T = 1, λ = 1: TA → θ₁; TIES with k = 100% → θ₁; DARE with p = 0 → θ₁."""
    base = state(0)
    one = finetuned(base, 1)
    cases = {"task_arithmetic": {}, "ties": {"density": 1.0}, "dare_linear": {"density": 1.0},
             "dare_ties": {"density": 1.0}}
    for method, hp in cases.items():
        out = ss.merge(method, base=base, models=[one], **hp)
        assert torch.allclose(out["layer.weight"], one["layer.weight"], atol=1e-6), method


def test_task_arithmetic_is_linear():
    """Spec 6: θ₀ + λ Σ τ_t tensor by tensor; weights scale each task vector; negation subtracts."""
    base = state(0)
    models = [finetuned(base, s) for s in (1, 2)]
    out = ss.merge("task_arithmetic", base=base, models=models, scaling=0.3, weights=[1.0, -2.0])
    want = base["layer.weight"] + 0.3 * ((models[0]["layer.weight"] - base["layer.weight"])
                                         - 2 * (models[1]["layer.weight"] - base["layer.weight"]))
    assert torch.allclose(out["layer.weight"], want, atol=1e-6)


def test_ties_sign_election():
    """Spec 3: agreeing signs → their mean; equal and opposite → the majority sign of the tensor."""
    f = ss.merge.ties
    base = torch.zeros(4)
    a = torch.tensor([1.0, 2.0, 1.0, 3.0])
    b = torch.tensor([3.0, -2.0, 1.0, 1.0])
    out = f(base, [a, b], density=1.0)
    assert out[0] == 2.0 and out[2] == 1.0 and out[3] == 2.0
    assert out[1] == 2.0  # vote 0: the tensor's majority sign (+) wins, so the merged entry is +2, not 0
    out = f(base, [-a, -b], density=1.0)
    assert out[1] == -2.0


def test_ties_trim_keeps_top_k_and_ties():
    """Spec 4: the top ⌊kP⌋ entries by magnitude; entries tied at the threshold are all kept."""
    base = torch.zeros(10)
    tau = torch.tensor([5.0, -4.0, 3.0, 0.1, 0.2, -0.3, 0.4, 3.0, 0.0, 1.0])
    out = ss.merge.ties(base, [tau], density=0.3)
    assert torch.equal(out, tau * (tau.abs() >= 3.0))  # k = 3 → threshold 3.0; both 3.0 entries kept (4 entries)
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(1000, generator=g)
    out = ss.merge.ties(torch.zeros(1000), [tau], density=0.2)
    assert int((out != 0).sum()) == 200
    assert out.abs().min() == 0 and out[out != 0].abs().min() >= tau.abs().sort().values[-200]


def test_ties_model_scope_trims_over_the_whole_task_vector():
    base = {"a": torch.zeros(10), "b": torch.zeros(10)}
    tau = {"a": torch.arange(1.0, 11.0), "b": 0.01 * torch.arange(1.0, 11.0)}
    model = {k: base[k] + tau[k] for k in base}
    per_tensor = ss.merge("ties", base=base, models=[model], density=0.5)
    whole = ss.merge("ties", base=base, models=[model], density=0.5, trim="model")
    assert int((per_tensor["b"] != 0).sum()) == 5
    assert int((whole["b"] != 0).sum()) == 1 and int((whole["a"] != 0).sum()) == 10  # official count: ⌊kP⌋ + 1


def test_dare_unbiased_and_exact_rescale():
    """Spec 5: E[τ̃] = τ; the fraction of zeros ≈ p; survivors equal τ/(1 − p) exactly."""
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(20000, generator=g) + 0.5
    base = torch.zeros_like(tau)
    out = ss.merge.dare_linear(base, [tau], density=0.1, generator=torch.Generator().manual_seed(1))
    kept = out != 0
    assert abs(1 - kept.float().mean().item() - 0.9) < 0.01
    assert torch.equal(out[kept], tau[kept] / 0.1)
    n, d = 4000, 0.3  # every row is an independent draw for the same τ
    rows = ss.merge.dare_linear(torch.zeros(n, 50), [tau[:50].expand(n, 50)], density=d,
                                generator=torch.Generator().manual_seed(2))
    std_of_mean = tau[:50].abs() * ((1 - d) / d / n) ** 0.5
    assert ((rows.mean(0) - tau[:50]).abs() <= 4 * std_of_mean + 1e-6).all()


def test_dare_seeded_and_per_tensor():
    base = state(0)
    models = [finetuned(base, s) for s in (1, 2)]
    a = ss.merge("dare_ties", base=base, models=models, density=0.5, seed=3)
    b = ss.merge("dare_ties", base=base, models=models, density=0.5, seed=3)
    c = ss.merge("dare_ties", base=base, models=models, density=0.5, seed=4)
    assert torch.equal(a["layer.weight"], b["layer.weight"]) and not torch.equal(a["layer.weight"], c["layer.weight"])
    l1 = ss.merge.dare_linear(torch.zeros(100), [torch.ones(100)], density=0.5, rescale="l1",
                              generator=torch.Generator().manual_seed(0))
    assert torch.isclose(l1.abs().sum(), torch.tensor(100.0))


def test_breadcrumbs_drops_outliers_and_small_entries():
    tau = torch.arange(1.0, 101.0)
    out = ss.merge.breadcrumbs(torch.zeros(100), [tau], density=0.5, gamma=0.1)
    kept = tau[out != 0]
    assert kept.numel() == 50 and kept.min() == 41 and kept.max() == 90


def test_model_stock_interpolation_ratio():
    """Two orthogonal task vectors (cos 0) → t = 0: the base; identical ones (cos 1) → t = 1: their average."""
    base = torch.zeros(4)
    e1, e2 = torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])
    assert torch.equal(ss.merge.model_stock(base, [e1, e2]), base)
    assert torch.allclose(ss.merge.model_stock(base, [e1, e1]), e1)
    with pytest.raises(SubspacesError, match="at least 2"):
        ss.merge.model_stock(base, [e1])


def test_linear_without_base_is_the_average():
    models = [state(s) for s in (1, 2, 3)]
    out = ss.merge("linear", models=models, weights=[1.0, 1.0, 2.0])
    want = (models[0]["layer.weight"] + models[1]["layer.weight"] + 2 * models[2]["layer.weight"]) / 4
    assert torch.allclose(out["layer.weight"], want, atol=1e-6)
    assert torch.equal(out["ids"], models[0]["ids"])


@pytest.mark.parametrize("method", [e.name for e in MERGE.entries()])
def test_every_merge_method_declares_its_kind_and_cites_its_paper(method):
    entry = MERGE.get(method)
    kind = getattr(entry.obj, "kind", None)
    assert kind in ("tensor", "learned", "stream", "lora", "inference")
    assert kind == "tensor" or callable(getattr(entry.obj, "run", None))
    module = __import__(entry.obj.__module__, fromlist=["_"])
    assert entry.paper.startswith("https://arxiv.org/abs/") and entry.paper in module.__doc__
    assert entry.status == "complete" or entry.note
