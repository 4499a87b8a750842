"""Conformance: every registered adapter passes the same contract tests (DESIGN.md, "Contracts").

A method registered with ``@ADAPTERS.register`` is enrolled here automatically. Its config is built from the
class defaults plus the small overrides in ``OVERRIDES`` (keyed by registry name) so the tiny test models fit.
"""
from __future__ import annotations

import copy
import dataclasses
import sys

import pytest
import torch
from conftest import bert_seqcls, ids, llama_causal, logits

import subspaces as ss
import subspaces.adapters  # noqa: F401  (importing registers the methods)
from subspaces._registry import ADAPTERS
from subspaces.adapters._core import DELTA, AdapterConfig, adapted_layers

OVERRIDES: dict[str, dict] = {
    "adalora": {"init_r": 4, "target_r": 2, "alpha": 256.0},  # ΔW ∝ E·A·B from E = 0, A, B ~ N(0, .02²): moves slowly
    "increlora": {"rank": 2, "target_rank": 4, "alpha": 256.0},
    "sora": {"rank": 2},
    "intrinsic": {"dim": 64},
    "said": {"dim": 64},
    "maestro": {"init": "svd", "rank": None},  # full-rank SVD factors: output equals the base at init
    "nola": {"rank": 2, "k_a": 8, "k_b": 8},
    "randlora": {"rank": 4, "alpha": 8.0},
    "lora_xs": {"rank": 2},
    "mos": {"rank": 3, "equivalent_rank": 2, "private_rank": 1, "shards_per_vector": 2},  # L = 2 layers/type
    "lora_sb": {"rank": 2, "alpha": 16.0},
    "svfit": {"energy": 1.0},  # r = k: tiny-init BERT logits move little under singular-value-only tuning
    "salt": {"ratio": 0.25, "lora_rank": 2},
    "lora": {"rank": 2, "alpha": 4.0},
    "flora": {"rank": 2, "alpha": 4.0},
}

MODELS = {
    "bert": (bert_seqcls, ["query", "value"]),
    "llama": (llama_causal, "all-linear"),  # non-square k_proj/v_proj (16x32) and mlp (64x32, 32x64)
}

METHODS = [e.name for e in ADAPTERS.entries()]


def config_for(name: str) -> AdapterConfig:
    return ADAPTERS.get(name).obj(**OVERRIDES.get(name, {}))


def setup(name: str, model: str):
    build, targets = MODELS[model]
    base = build()
    m = copy.deepcopy(base)
    ss.adapt_(m, config_for(name), targets=targets)
    return base, m


def train(m, steps: int = 3, lr: float = 1e-2):
    """A few AdamW steps on the adapter parameters (moves every adapter away from its init)."""
    x = ids(seed=7)
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=lr, weight_decay=0.0)
    m.train()
    for _ in range(steps):
        out = m(input_ids=x)
        loss = out.logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    m.eval()


def test_registry_is_not_empty():
    assert "lora" in METHODS


@pytest.mark.parametrize("name", METHODS)
def test_config_contract(name):
    entry = ADAPTERS.get(name)
    cls = entry.obj
    assert issubclass(cls, AdapterConfig)
    assert dataclasses.is_dataclass(cls)
    assert cls.registry_name == name
    assert cls.__module__.rsplit(".", 1)[-1] == name  # the file stem is the registry key
    assert entry.paper.startswith("https://")
    assert entry.paper in (sys.modules[cls.__module__].__doc__ or "")  # the docstring cites the paper
    config = config_for(name)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(config, dataclasses.fields(cls)[0].name, None)
    with pytest.raises(TypeError):
        cls(*[getattr(config, f.name) for f in dataclasses.fields(cls)][:1])  # keyword-only
    assert cls.from_dict(config.to_dict()) == config
    with pytest.raises(ss.SubspacesError, match="valid"):
        cls.from_dict({**config.to_dict(), "not_a_field": 1})


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", METHODS)
def test_output_equals_base_at_init(name, model):
    if not ADAPTERS.get(name).obj.identity_at_init:
        pytest.skip(f"{name} starts from a nonzero update, as its paper does")
    base, m = setup(name, model)
    x = ids()
    assert adapted_layers(m)
    torch.testing.assert_close(logits(m, x), logits(base, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", METHODS)
def test_only_adapter_parameters_train(name, model):
    base, m = setup(name, model)
    params = ss.adapter_parameters(m)
    assert params
    assert {id(p) for p in params} == {id(p) for p in m.parameters() if p.requires_grad}
    before = {k: v.detach().clone() for k, v in m.state_dict().items()}
    # an optimizer over *every* parameter: frozen ones must get no gradient and stay put
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = ids(seed=3)
    m(input_ids=x).logits.pow(2).mean().backward()
    opt.step()
    after = m.state_dict()
    adapter_keys = {k for k in after if f".{DELTA}." in k}
    assert adapter_keys
    for k in after:
        if k not in adapter_keys:
            assert torch.equal(after[k], before[k]), f"{k} changed"
    assert any(not torch.equal(after[k], before[k]) for k in adapter_keys)
    assert all(p.grad is None for n, p in m.named_parameters() if f".{DELTA}." not in n)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", METHODS)
def test_fold_equals_unfolded(name, model):
    base, m = setup(name, model)
    train(m)
    x = ids()
    adapted = logits(m, x)
    assert (adapted - logits(base, x)).abs().max() > 1e-4  # training moved the adapter
    ss.fold_(m)
    assert list(m.state_dict()) == list(base.state_dict())
    assert not adapted_layers(m)
    torch.testing.assert_close(logits(m, x), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", METHODS)
def test_native_save_load_round_trip(name, model, tmp_path):
    base, m = setup(name, model)
    train(m)
    x = ids()
    adapted = logits(m, x)
    ss.save_adapter(m, tmp_path / name)
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / name)
    torch.testing.assert_close(logits(loaded, x), adapted, atol=1e-6, rtol=0)
    assert [n for n, _ in adapted_layers(loaded)] == [n for n, _ in adapted_layers(m)]
    assert sum(p.numel() for p in ss.adapter_parameters(loaded)) == sum(p.numel() for p in ss.adapter_parameters(m))
    ss.unadapt_(loaded)
    torch.testing.assert_close(logits(loaded, x), logits(base, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("name", METHODS)
def test_trainable_count_matches_config(name, model):
    _, m = setup(name, model)
    layers = adapted_layers(m)
    config = layers[0][1]._modules[DELTA].config
    expected = config.num_trainable_total([layer for _, layer in layers])
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == expected
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("name", METHODS)
def test_unadapt_restores_base(name):
    base, m = setup(name, "llama")
    train(m)
    ss.unadapt_(m)
    x = ids()
    torch.testing.assert_close(logits(m, x), logits(base, x), atol=1e-5, rtol=0)
    assert all(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_export_lora_is_exact_and_truncates_with_a_report(name, tmp_path):
    """Any foldable adapter exports to a plain PEFT LoRA: exact at rank=None, truncated SVD at a given rank."""
    base, m = setup(name, "llama")
    train(m)
    x = ids()
    adapted = logits(m, x)
    report = ss.export_lora(m, tmp_path / "exact")
    assert {r["name"] for r in report} == {n for n, _ in adapted_layers(m)}
    assert max(r["relative_error"] for r in report) < 1e-5
    exact = ss.load_adapter(copy.deepcopy(base), tmp_path / "exact")
    torch.testing.assert_close(logits(exact, x), adapted, atol=1e-4, rtol=0)
    report1 = ss.export_lora(m, tmp_path / "rank1", rank=1)
    assert all(r["rank"] == 1 for r in report1)
    for r, r1 in zip(report, report1):  # truncation error is reported, and zero only where ΔW had rank 1
        assert (r1["relative_error"] > 1e-6) == (r["rank"] > 1)
