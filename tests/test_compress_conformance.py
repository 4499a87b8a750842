"""Conformance: every registered compress method passes the same contract tests, enrolled from the registry.

Layer-level methods (``compress``): at full rank the model's outputs are unchanged; at a 30% budget the parameters
fall by about that much, the logits stay finite, and the saved folder reloads to identical logits; a bf16 model stays
bf16. Model-level methods (``compress_model``) run through ``compress_`` on the tiny model with small settings.
Every method cites its paper and rejects an unknown hyperparameter with a clear error.
"""
from __future__ import annotations

import pytest
import torch

import subspaces as ss
import subspaces.compress  # noqa: F401  (importing registers the methods)
from subspaces._errors import SubspacesError
from subspaces._registry import COMPRESS
from subspaces.compress import load_compressed, save_compressed

MODEL_LEVEL = {  # small settings for the tiny model
    "eora": {"method": {"rank": 2}, "budget": {"ratio": 0.3}},
    "pela": {"method": {"steps": 2}, "budget": {"ratio": 0.3}},
    "matryoshka_kv": {"method": {"train_steps": 0, "search": "uniform"}, "budget": {"ratio": 0.5}},
    "scatterbrain": {"method": {"nb_features": 8, "n_hashes": 1, "bucket_size": 4}, "budget": {}},
}
ALL = [e.name for e in COMPRESS.entries()]
LAYER = [n for n in ALL if hasattr(COMPRESS.get(n).obj, "compress")]
MODEL = [n for n in ALL if n not in LAYER]


def model(dtype=torch.float32):
    return ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0).to(dtype).eval()


def batches(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 12), generator=g) for _ in range(n)]


def logits(m, x):
    with torch.no_grad():
        return m(x).logits.float()


def test_every_method_is_enrolled():
    assert set(MODEL) <= set(MODEL_LEVEL), "give the new model-level method small settings in MODEL_LEVEL"
    assert {"svd", "fwsvd", "asvd", "svd_llm", "afm"} <= set(LAYER)


@pytest.mark.parametrize("name", ALL)
def test_cites_paper_and_rejects_unknown_hyperparameters(name):
    entry = COMPRESS.get(name)
    assert entry.paper.startswith("https://") and entry.paper in (entry.obj.__module__ and
                                                                 __import__(entry.obj.__module__, fromlist=["_"]).__doc__)
    with pytest.raises(SubspacesError, match=name):
        ss.compress_(model(), name, ratio=0.3, calibration=batches(1), no_such_field=1)


@pytest.mark.parametrize("name", LAYER)
def test_full_rank_keeps_outputs(name):
    m, data = model(), batches()
    ref = logits(m, data[0])
    ss.compress_(m, name, rank=64, calibration=data)  # clamped to min(out, in) per layer
    torch.testing.assert_close(logits(m, data[0]), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", LAYER)
def test_budget_save_and_reload(name, tmp_path):
    m, data = model(), batches()
    rep = ss.compress_(m, name, ratio=0.3, calibration=data)
    assert 0.25 < rep["ratio"] < 0.4, rep["ratio"]
    assert rep["params_after"] == sum(p.numel() for n, p in m.named_parameters()
                                      if any(n.startswith(r["name"] + ".") for r in rep["layers"]))
    out = logits(m, data[0])
    assert torch.isfinite(out).all()
    assert all(r["output_error"] is not None and r["output_error"] >= 0 for r in rep["layers"])
    save_compressed(m, tmp_path / "m", report=rep)
    torch.testing.assert_close(logits(load_compressed(tmp_path / "m"), data[0]), out, rtol=0, atol=0)


@pytest.mark.parametrize("name", LAYER)
def test_bf16_model_stays_bf16(name):
    m, data = model(torch.bfloat16), batches(2)
    rep = ss.compress_(m, name, ratio=0.3, calibration=data)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits(m, data[0])).all() and rep["params_after"] < rep["params_before"]


@pytest.mark.parametrize("name", MODEL)
def test_model_level_methods_run(name):
    m, data = model(), batches()
    settings = MODEL_LEVEL[name]
    # A config object: EoRA's own `rank` is not compress_'s `rank` (the base method's ranks).
    config = ss.compress.config_for(name, settings["method"])
    rep = ss.compress_(m, config, calibration=data, **settings["budget"])
    assert isinstance(rep, dict) and rep.get("method") == name
    assert torch.isfinite(logits(m, data[0])).all()
