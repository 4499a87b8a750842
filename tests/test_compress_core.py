"""The compress core: streaming calibration, rank allocation, the report, saving and reloading."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.compress import _calibrate, allocate, load_compressed, save_compressed, useful_rank
from subspaces.nn import LowRankLinear


def model(seed: int = 0):
    return ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=seed).eval()


def batches(n: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 10), generator=g) for _ in range(n)]


def test_streaming_moments_equal_one_pass():
    torch.manual_seed(0)
    xs = [torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(3)]
    s = _calibrate.LayerStats()
    for x in xs:
        s.add_inputs(x)
    X = torch.cat([x.reshape(-1, 4) for x in xs])
    assert s.tokens == 45
    torch.testing.assert_close(s.input_moment(), X.T @ X / 45)
    torch.testing.assert_close(s.input_mean(), X.mean(0))
    s.add_outputs(torch.cat(xs).reshape(-1, 4))
    torch.testing.assert_close(s.output_cov(), torch.cov(X.T, correction=0))


def test_sequential_stats_match_hooked_full_model():
    """Block-by-block replay gives every layer the inputs it sees in the full model (no layer replaced)."""
    m, data = model(), batches()
    layers = dict(ss.compress._core.target_linears(m, "all-linear", None))
    seen = {}

    def process(name, layer, stats):
        seen[name] = stats.input_moment()

    _calibrate.run_sequential(m, dict(layers), data, {"inputs"}, process)
    ref = {n: _calibrate.LayerStats() for n in layers}
    hooks = [l.register_forward_hook(lambda mod, a, o, n=n: ref[n].add_inputs(a[0])) for n, l in layers.items()]
    with torch.no_grad():
        for b in data:
            m(b)
    for h in hooks:
        h.remove()
    assert set(seen) == set(layers)
    for n in layers:
        torch.testing.assert_close(seen[n], ref[n].input_moment(), rtol=1e-5, atol=1e-6)


def test_sequential_feeds_processed_blocks_forward():
    m, data = model(), batches(1)
    layers = dict(ss.compress._core.target_linears(m, "all-linear", None))
    first = "model.layers.0.mlp.down_proj"
    later = "model.layers.1.self_attn.q_proj"
    seen = {}

    def process(name, layer, stats):
        seen[name] = stats.input_moment()
        if name == first:  # zero block 0's MLP output: block 1 then sees a different residual stream
            with torch.no_grad():
                layer.weight.zero_()

    _calibrate.run_sequential(m, dict(layers), data, {"inputs"}, process)
    fresh = model()
    ref = {}
    fresh.model.layers[1].self_attn.q_proj.register_forward_hook(lambda mod, a, o: ref.setdefault("x", a[0]))
    with torch.no_grad():
        fresh(data[0])
    X = ref["x"].reshape(-1, 32).double()
    assert not torch.allclose(seen[later], X.T @ X / X.shape[0], atol=1e-4)
    fresh.model.layers[0].mlp.down_proj.weight.data.zero_()
    ref.clear()
    with torch.no_grad():
        fresh(data[0])
    X = ref["x"].reshape(-1, 32).double()
    torch.testing.assert_close(seen[later], X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)


def test_fisher_of_linear_regression():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, bias=False)
    net = nn.Sequential(lin)
    xs = [torch.randn(4, 3) for _ in range(2)]
    ys = [torch.randn(4, 2) for _ in range(2)]
    data = [{"x": x, "y": y} for x, y in zip(xs, ys)]
    stats = _calibrate.fisher(net, {"0": lin}, data, lambda mod, b: ((mod(b["x"]) - b["y"]) ** 2).sum())
    g2 = sum((2 * (lin(x) - y).T @ x).detach().double() ** 2 for x, y in zip(xs, ys))
    torch.testing.assert_close(stats["0"].fisher("in"), g2.sum(0) / 2)
    torch.testing.assert_close(stats["0"].fisher("out"), g2.sum(1) / 2)
    assert lin.weight.grad is None and lin.weight.requires_grad


def test_uniform_allocation_meets_ratio():
    shapes = {"a": (64, 64), "b": (128, 64), "c": (64, 256)}
    ranks = allocate(shapes, ratio=0.3)
    kept = sum(r * (m + n) for (m, n), r in zip(shapes.values(), ranks.values()))
    total = sum(m * n for m, n in shapes.values())
    assert 0.3 <= 1 - kept / total < 0.33
    assert all(1 <= r <= useful_rank(shapes[k]) for k, r in ranks.items())


@pytest.mark.parametrize("how", ["energy", "welore"])
def test_spectral_allocations_meet_budget_and_favour_low_rank_layers(how):
    torch.manual_seed(0)
    shapes = {"flat": (48, 48), "steep": (48, 48)}
    spectra = {"flat": torch.ones(48), "steep": 0.7 ** torch.arange(48.0)}
    ranks = allocate(shapes, spectra, ratio=0.5, allocation=how)
    kept = sum(r * 96 for r in ranks.values())
    assert kept <= 0.5 * 2 * 48 * 48
    assert ranks["flat"] > ranks["steep"] >= 1


def test_energy_rank_and_fixed_ranks():
    spectra = {"a": torch.tensor([3.0, 2.0, 1.0, 0.0])}
    assert allocate({"a": (4, 40)}, spectra, energy=0.9) == {"a": 2}  # 9+4 = 13 of 14 > 0.9
    assert allocate({"a": (4, 40), "b": (8, 8)}, rank={"a": 2}) == {"a": 2, "b": None}
    with pytest.raises(SubspacesError, match="exactly one"):
        allocate({"a": (4, 4)}, ratio=0.2, rank=2)
    with pytest.raises(SubspacesError, match="ratio"):
        allocate({"a": (4, 4)}, ratio=1.5)
    with pytest.raises(SubspacesError, match="allocation"):
        allocate({"a": (4, 4)}, ratio=0.2, allocation="magic")
    with pytest.raises(SubspacesError, match="not targeted"):
        allocate({"a": (4, 4)}, rank={"zz": 2})


def test_report_and_output_error_formula():
    m, data = model(), batches()
    rep = ss.compress_(m, "svd", ratio=0.3, calibration=data)
    assert 0.28 < rep["ratio"] < 0.36 and rep["params_after"] < rep["params_before"]
    rows = {r["name"]: r for r in rep["layers"]}
    # q_proj of block 1 sees the compressed block 0 and nothing else of its own block: its inputs are the ones the
    # sequential calibration recorded.
    name = "model.layers.1.self_attn.q_proj"
    layer = m.get_submodule(name)
    assert isinstance(layer, LowRankLinear) and layer.rank == rows[name]["rank"]
    xs = []
    m.get_submodule(name).register_forward_hook(lambda mod, a, o: xs.append(a[0]))
    with torch.no_grad():
        for b in data:
            m(b)
    X = torch.cat([x.reshape(-1, 32) for x in xs]).double()
    W = model().get_submodule(name).weight.detach().double()
    y, y2 = X @ W.T, X @ layer.weight.detach().double().T
    expect = ((y - y2).square().sum() / y.square().sum()).sqrt()
    assert rows[name]["output_error"] == pytest.approx(float(expect), rel=1e-4)
    assert rows[name]["weight_error"] == pytest.approx(float((W - layer.weight.detach().double()).norm() / W.norm()), rel=1e-5)


def test_no_calibration_means_no_output_error_and_bad_inputs_are_named():
    rep = ss.compress_(model(), "svd", rank=4)
    assert all(r["output_error"] is None and r["rank"] == 4 for r in rep["layers"])
    with pytest.raises(SubspacesError, match="did you mean|Valid"):
        ss.compress_(model(), "svdd", ratio=0.2)
    with pytest.raises(SubspacesError, match="svd="):
        ss.compress_(model(), "svd", ratio=0.2, svd="fast")
    with pytest.raises(SubspacesError, match="matches no module"):
        ss.compress_(model(), "svd", ratio=0.2, targets=["nothing_here"])
    with pytest.raises(SubspacesError, match="calibration batch"):
        ss.compress_(model(), "svd", ratio=0.2, calibration=["text"])
    with pytest.raises(SubspacesError, match="empty"):
        ss.compress_(model(), "svd", ratio=0.2, calibration=[])


def test_save_and_load_give_identical_logits(tmp_path):
    m, data = model(), batches()
    rep = ss.compress_(m, "svd", ratio=0.4, allocation="energy", calibration=data)
    out = tmp_path / "compressed"
    save_compressed(m, out, report=rep)
    meta = json.loads((out / "compression.json").read_text())
    assert len(meta["modules"]) == len(rep["layers"]) and meta["report"]["method"] == "svd"
    again = load_compressed(out)
    with torch.no_grad():
        torch.testing.assert_close(again(data[0]).logits, m(data[0]).logits, rtol=0, atol=0)
    with pytest.raises(SubspacesError, match="already exists"):
        save_compressed(m, out)
    with pytest.raises(SubspacesError, match="compression.json"):
        load_compressed(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compressed"]  # no temporary folder left


def test_bf16_model_compresses_in_its_dtype():
    m = model().to(torch.bfloat16)
    data = batches(2)
    rep = ss.compress_(m, "svd", ratio=0.3, calibration=data)
    layer = m.get_submodule(rep["layers"][0]["name"])
    assert layer.down.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(m(data[0]).logits.float()).all()


def test_saving_refuses_adapters_and_keeps_kv_projections(tmp_path):
    m, data = model(), batches()
    ref = ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0)
    ss.compress.quantize_rtn_(m, bits=4, group_size=16)
    ss.compress.eora_(m, ref, data, rank=2)
    with pytest.raises(SubspacesError, match="adapters"):
        save_compressed(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    kv = model()
    ss.compress_(kv, ss.compress.MatryoshkaKV(train_steps=0, search="uniform"), ratio=0.5, calibration=data)
    save_compressed(kv, tmp_path / "kv")
    again = load_compressed(tmp_path / "kv")
    with torch.no_grad():
        torch.testing.assert_close(again(data[0]).logits, kv(data[0]).logits, rtol=0, atol=0)
