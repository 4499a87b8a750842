"""Parity with mergekit (the reference implementation, installed for the tests): the same YAML gives the same tensors.

linear, task_arithmetic, ties, breadcrumbs and model_stock: whole tiny-LLaMA merges through mergekit's ``run_merge``
and our YAML reader, compared tensor by tensor (≤ 1e-6, fp32). dare_linear and dare_ties draw random masks: mergekit
draws them from the global RNG in the order it schedules tensors, so they are compared tensor by tensor with the same
seed given to both (mergekit's ``merge_group`` after ``torch.manual_seed(s)``, ours with a generator seeded ``s``).
"""
from __future__ import annotations

import pytest
import torch

import subspaces as ss
from subspaces.integrations.mergekit import from_mergekit

mergekit = pytest.importorskip("mergekit")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base = ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        m = ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        paths[f"m{i}"] = root / f"m{i}"
        m.save_pretrained(paths[f"m{i}"])
    return paths


def _config(method, paths, shared=None, per_model=None):
    models = [{"model": str(paths[f"m{i}"]), "parameters": dict(per_model[i]) if per_model else {}} for i in range(3)]
    cfg = {"merge_method": method, "models": models, "dtype": "float32"}
    if method != "linear":  # mergekit's linear averages its base too (it would need a weight): give none
        cfg["base_model"] = str(paths["base"])
    if shared:
        cfg["parameters"] = shared
    return cfg


def _mergekit(cfg, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    return ss.merge.load_state_dict(out)


CASES = {
    "linear": ({}, [{"weight": w} for w in (0.5, 0.3, 0.2)]),
    "task_arithmetic": ({"lambda": 0.7}, [{"weight": w} for w in (1.0, 0.5, -0.3)]),
    "ties": ({"normalize": True}, [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (0.6, 0.5), (0.8, 0.2))]),
    "ties_sum": ({"normalize": False, "lambda": 0.5}, [{"weight": 1.0, "density": 0.4}] * 3),
    "breadcrumbs": ({"gamma": 0.05}, [{"weight": w, "density": 0.8} for w in (1.0, 0.5, 0.7)]),
    "model_stock": ({}, None),
    "model_stock_filter": ({"filter_wise": True}, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_whole_model_equals_mergekit(case, checkpoints, tmp_path):
    method = case.split("_sum")[0].replace("_filter", "")
    shared, per_model = CASES[case]
    cfg = _config(method, checkpoints, shared, per_model)
    theirs = _mergekit(cfg, tmp_path / "mergekit")
    kwargs = from_mergekit(cfg)
    ours = ss.merge(kwargs.pop("method"), **kwargs)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-6), (k, (ours[k] - theirs[k]).abs().max())


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_mergekit_tensor_by_tensor(method, checkpoints):
    from mergekit.merge_methods.base import TensorGroup
    from mergekit.merge_methods.registry import get

    theirs_method = get(method)
    ours_fn = getattr(ss.merge, method)
    sds = [ss.merge.load_state_dict(checkpoints[k]) for k in ("base", "m0", "m1", "m2")]
    density, weight = {1: 0.3, 2: 0.5, 3: 0.7}, {1: 1.0, 2: 0.6, 3: 0.8}
    params = {"density": density, "weight": weight, "rescale": True, "normalize": False, "lambda": 1.0,
              "int8_mask": False}
    for i, k in enumerate(sds[0]):
        group = TensorGroup.from_tensors([sd[k] for sd in sds], base_index=0, name=k)
        torch.manual_seed(100 + i)
        expected = theirs_method.merge_group(group, **params)
        g = torch.Generator().manual_seed(100 + i)
        got = ours_fn(sds[0][k], [sd[k] - sds[0][k] for sd in sds[1:]], weights=list(weight.values()),
                      density=list(density.values()), rescale="l1", normalize=False, generator=g)
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), (k, (got - expected).abs().max())
