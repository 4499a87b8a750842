"""Random-subspace training faithful tests (methods/adapter-intrinsic-dimension.md): ``intrinsic`` (Li et al. 2018)
and ``said`` (Aghajanyan et al. 2021), plus the Walsh–Hadamard transform and Fastfood operator of ``linalg``."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ids, llama_causal, logits, randomize_adapters
from safetensors.torch import load_file
from scipy.linalg import hadamard
from torch import nn

import subspaces as ss
from subspaces.adapters._core import DELTA, adapted_layers, owner_of
from subspaces.linalg import Fastfood, fwht

KEYS = ["intrinsic", "said"]
PROJECTIONS = ["fastfood", "dense", "sparse"]


def adapted(key="intrinsic", base=None, **kw):
    base = base if base is not None else llama_causal()
    m = copy.deepcopy(base)
    ss.adapt_(m, key, targets="all-linear", **{"dim": 64, **kw})
    return base, m


def deltas(m):
    return [layer._modules[DELTA] for _, layer in adapted_layers(m)]


def explicit_fastfood(ff: Fastfood, d: int) -> torch.Tensor:
    """(H G Π H B)[:D, :d] / divisor from scipy's Hadamard matrix; columns ≥ L are zero (negative-pad quirk)."""
    L = ff.L
    H = torch.tensor(hadamard(L), dtype=torch.float64)
    Pi = torch.zeros(L, L, dtype=torch.float64)
    Pi[torch.arange(L), ff.perm] = 1  # (Π v)_i = v[perm_i]
    M = H @ torch.diag(ff.G.double()) @ Pi @ H @ torch.diag(ff.B.double())
    out = torch.zeros(ff.D, d, dtype=torch.float64)
    k = min(d, L)
    out[:, :k] = M[: ff.D, :k] / ff.divisor
    return out


# linalg: Walsh–Hadamard transform and Fastfood ------------------------------------------------------------------

@pytest.mark.parametrize("L", [1, 2, 8, 32, 64, 512, 2048])
def test_fwht_matches_scipy_hadamard(L):
    x = torch.randn(3, 2, L, dtype=torch.float64)
    H = torch.tensor(hadamard(L), dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ H)


def test_fwht_is_its_own_inverse_up_to_L_and_checks_length():
    x = torch.randn(2, 2**15, dtype=torch.float64)
    torch.testing.assert_close(fwht(fwht(x)), 2**15 * x)
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.ones(12))


@pytest.mark.parametrize("D,d", [(12, 5), (100, 64), (1000, 30), (12, 40)])  # (12, 40): d > L = 16
def test_fastfood_equals_materialized_matrix_and_gradient_is_transpose(D, d):
    ff = Fastfood(D, seed=3, dtype=torch.float64)
    P = explicit_fastfood(ff, d)
    torch.testing.assert_close(ff.matrix(d), P)
    theta = torch.randn(d, dtype=torch.float64, requires_grad=True)
    y = ff(theta)
    torch.testing.assert_close(y, P @ theta.detach())
    g = torch.randn(D, dtype=torch.float64)
    (grad,) = torch.autograd.grad(y, theta, g)
    torch.testing.assert_close(grad, P.T @ g)
    assert torch.autograd.gradcheck(ff, (theta,))
    if d > ff.L:  # the quirk: only θ[:L] reaches the tensor
        assert torch.equal(P[:, ff.L:], torch.zeros(D, d - ff.L, dtype=torch.float64))


def test_fastfood_normalization_seed_and_global_rng():
    state = torch.get_rng_state()
    a, b, c = Fastfood(3000, seed=1), Fastfood(3000, seed=1), Fastfood(3000, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("B", "perm", "G"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.G, c.G)
    norms = a.matrix(50).norm(dim=0)  # each column ≈ unit norm
    assert (norms - 1).abs().max() < 0.1
    assert set(a.state_dict()) == set()  # regenerated from the seed, never saved


# 1. θ_d = 0 at init: the model is exactly θ0 ---------------------------------------------------------------------

@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("key", KEYS)
def test_identity_at_init(key, projection):
    base, m = adapted(key, projection=projection)
    x = ids()
    assert torch.equal(logits(m, x), logits(base, x))
    owner = owner_of(deltas(m)[0])
    assert torch.equal(owner.theta_d, torch.zeros_like(owner.theta_d))
    if key == "said":
        assert torch.equal(owner.said_lambda, torch.ones_like(owner.said_lambda))


# 2. trainable count d in total (SAID: d − m for θ_d, m for λ) ----------------------------------------------------

@pytest.mark.parametrize("key", KEYS)
def test_trainable_count_is_d(key):
    _, m = adapted(key, dim=100)
    ds = deltas(m)
    params = dict(ds[0].named_parameters())
    assert all(not list(d.parameters()) for d in ds[1:])  # one θ_d for the whole group
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == 100
    if key == "said":
        assert params["theta_d"].numel() == 100 - len(ds) and params["said_lambda"].numel() == len(ds)
    else:
        assert set(params) == {"theta_d"} and params["theta_d"].numel() == 100
    with pytest.raises(ss.SubspacesError, match="number of adapted tensors"):
        adapted("said", dim=len(ds))


# 3. dense / sparse: unit-norm basis vectors over all layers, PᵀP ≈ I ----------------------------------------------

def full_projection(m) -> torch.Tensor:
    """P as a (d, D) matrix: the blocks of every adapted layer side by side."""
    blocks = []
    for d in deltas(m):
        if d.projection == "dense":
            blocks.append(d.proj)
        else:
            block = torch.zeros(owner_of(d).theta_d.numel(), d.size)
            block[d.rows, d.cols] = d.vals
            blocks.append(block)
    return torch.cat(blocks, 1).double()


@pytest.mark.parametrize("projection", ["dense", "sparse"])
def test_global_normalization_and_near_orthonormal(projection):
    _, m = adapted(projection=projection)
    P = full_projection(m)
    D = P.shape[1]
    torch.testing.assert_close(P.norm(dim=1), torch.ones(64, dtype=torch.float64))
    gram = P @ P.T
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() < 6 / D**0.5  # off-diagonals ~ 1/√D
    if projection == "sparse":
        for d in deltas(m):  # density 1/√D_ℓ, non-zeros ±(1/‖row‖)
            density = d.rows.numel() / (64 * d.size)
            assert abs(density * d.size**0.5 - 1) < 0.2
        vals = torch.cat([d.vals.abs() for d in deltas(m)])
        rows = torch.cat([d.rows for d in deltas(m)])
        torch.testing.assert_close(vals, 1 / torch.bincount(rows, minlength=64).float().sqrt()[rows])


def test_dense_refuses_huge_projection():
    layer = nn.Module()
    layer.fc = nn.Linear(1000, 1000)
    with pytest.raises(ss.SubspacesError, match=r"3e\+08 numbers.*fastfood"):
        ss.adapt_(layer, "intrinsic", targets=["fc"], dim=300, projection="dense")
    assert not adapted_layers(layer)


# 4. Fastfood inside the adapter: ΔW_ℓ = reshape(P_ℓ θ_d), the negative-pad quirk for small tensors ---------------

@pytest.mark.parametrize("key", KEYS)
def test_fastfood_delta_is_the_explicit_projection(key):
    torch.manual_seed(0)
    m = nn.Module()
    m.small, m.big = nn.Linear(4, 3), nn.Linear(8, 16)  # D = 12 (L = 16 < d), 128
    ss.adapt_(m, key, targets=["small", "big"], dim=40)
    randomize_adapters(m)
    owner = owner_of(m.small.delta)
    theta = owner.theta_d.detach().double()
    for i, layer in enumerate((m.small, m.big)):
        d = layer.delta
        P = explicit_fastfood(d.ff, theta.numel())
        lam = owner.said_lambda[i].item() if key == "said" else 1.0
        torch.testing.assert_close(d.weight().double(), (lam * P @ theta).view(layer.weight.shape),
                                   rtol=1e-5, atol=1e-6)
    # the quirk: entries of θ_d beyond L = 16 do not reach the 12-weight layer
    small, big = m.small.delta.weight().detach().clone(), m.big.delta.weight().detach().clone()
    with torch.no_grad():
        owner.theta_d[16:] += 1.0
    torch.testing.assert_close(m.small.delta.weight(), small)
    assert not torch.allclose(m.big.delta.weight(), big)  # L = 128 there: every entry counts


def test_said_lambda_scales_its_tensor():
    _, m = adapted("said")
    randomize_adapters(m)
    ds = deltas(m)
    owner = owner_of(ds[0])
    w0, w1 = ds[0].weight().detach().clone(), ds[1].weight().detach().clone()
    with torch.no_grad():
        owner.said_lambda[1] *= 3
    torch.testing.assert_close(ds[1].weight(), 3 * w1)
    torch.testing.assert_close(ds[0].weight(), w0)


# 5. reproducibility: same seed ⇒ same P; merged weights reproduce the subspace model ---------------------------

@pytest.mark.parametrize("projection", PROJECTIONS)
def test_same_seed_same_projection(projection):
    base = llama_causal()
    _, a = adapted(base=base, projection=projection)
    _, b = adapted(base=base, projection=projection)
    _, c = adapted(base=base, projection=projection, seed=1)
    for da, db, dc in zip(deltas(a), deltas(b), deltas(c)):
        ba, bb, bc = dict(da.named_buffers()), dict(db.named_buffers()), dict(dc.named_buffers())
        assert ba and all(torch.equal(ba[k], bb[k]) for k in ba)
        assert any(ba[k].shape != bc[k].shape or not torch.equal(ba[k], bc[k]) for k in ba)
    blocks = [dict(d.named_buffers()) for d in deltas(a)]  # layers get different blocks (seeded by name)
    assert any(blocks[0][k].shape != blocks[1][k].shape or not torch.equal(blocks[0][k], blocks[1][k])
               for k in blocks[0])


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("key", KEYS)
def test_fold_reproduces_subspace_model(key, projection):
    _, m = adapted(key, projection=projection)
    randomize_adapters(m, std=0.5)
    x = ids()
    ref = logits(m, x)
    ss.fold_(m)
    torch.testing.assert_close(logits(m, x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", PROJECTIONS)
@pytest.mark.parametrize("key", KEYS)
def test_saved_file_holds_only_theta_and_lambda(key, projection, tmp_path):
    base, m = adapted(key, projection=projection)
    randomize_adapters(m, std=0.5)
    x = ids()
    ref = logits(m, x)
    ss.save_adapter(m, tmp_path)
    saved = load_file(tmp_path / "subspaces_adapter.safetensors")
    expected = {"theta_d", "said_lambda"} if key == "said" else {"theta_d"}
    assert {k.rsplit(".", 1)[-1] for k in saved} == expected
    assert sum(v.numel() for v in saved.values()) == 64
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(loaded, x), ref)


# dtype: bf16 base, adapter tensors in the fp32 master dtype ------------------------------------------------------

@pytest.mark.parametrize("key", KEYS)
def test_bf16_base_keeps_fp32_subspace(key):
    base = llama_causal().to(torch.bfloat16)
    _, m = adapted(key, base=base)
    for p in ss.adapter_parameters(m):
        assert p.dtype == torch.float32
    d = deltas(m)[0]
    assert d.ff.G.dtype == torch.float32 and d.weight().dtype == torch.float32
    out = m(input_ids=ids(), labels=ids())
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    assert owner_of(d).theta_d.grad.abs().sum() > 0


def test_gpt2_conv1d_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    m = nn.Module()
    m.c = Conv1D(6, 5)  # weight (d_in = 5, d_out = 6)
    ss.adapt_(m, "intrinsic", targets=["c"], dim=20)
    randomize_adapters(m)
    x = torch.randn(3, 5)
    dw = m.c.delta.weight()
    assert dw.shape == (5, 6)
    torch.testing.assert_close(m.c(x), x @ (m.c.weight + dw) + m.c.bias)


def test_config_validation():
    for bad in ({"dim": 0}, {"dim": 2.5}, {"projection": "gaussian"}, {"seed": -1}):
        with pytest.raises(ss.SubspacesError):
            ss.adapters.Intrinsic(**bad)
    with pytest.raises(ss.SubspacesError, match="exceeds"):
        adapted(dim=10**6)


# stage 2: ss.measure.intrinsic_dimension (search logic, JSON, plot) with an injected training function -----------

def fake_train(calls):
    """Full fine-tuning scores 0.8; a subspace of dimension d scores 0.8·(1 − e^(−d/300)): d_int90 = 691."""
    import math

    def train(**kw):
        calls.append(kw)
        if kw["method"] == "full":
            return {"test_accuracy": 0.8, "loss_history": [1.0]}, None
        return {"test_accuracy": 0.8 * (1 - math.exp(-kw["hyperparameters"]["dim"] / 300))}
    return train


def test_intrinsic_dimension_search_json_and_plot(tmp_path):
    import json

    calls = []
    res = ss.measure.intrinsic_dimension(method="said", task="t", epochs=2, refine=3, out=tmp_path,
                                         train=fake_train(calls), progress=False, max_train=10)
    assert calls[0]["method"] == "full" and calls[0]["hyperparameters"] == {}
    first = calls[1]
    assert first["method"] == "said" and first["max_train"] == 10 and first["epochs"] == 2
    assert first["hyperparameters"] == {"dim": 10, "lr": 3e-2, "targets": "all-linear", "projection": "fastfood",
                                        "seed": 0, "train_head": False}
    # grid up to the first pass (1000), then bisection of (500, 1000): 707 passes, 595 and 649 fail
    assert [c["hyperparameters"]["dim"] for c in calls[1:]] == [10, 20, 50, 100, 200, 500, 1000, 707, 595, 649]
    assert res["dims"] == sorted(res["dims"]) and res["d_int"] == 707
    assert res["full_metric"] == 0.8 and res["target"] == pytest.approx(0.72) and res["threshold"] == 0.9
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["d_int"] == 707 and saved["dims"] == res["dims"] and len(saved["runs"]) == 11
    assert all("loss_history" not in r for r in saved["runs"])
    assert (tmp_path / "intrinsic_dimension.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["intrinsic_dimension.png", "results.json"]


def test_intrinsic_dimension_given_full_metric_no_early_stop_and_none_found():
    calls = []
    res = ss.measure.intrinsic_dimension(dims=[300, 30, 3000], full_metric=0.8, stop_early=False,
                                         train=fake_train(calls), progress=False)
    assert [c["hyperparameters"]["dim"] for c in calls] == [30, 300, 3000]  # no full run, increasing order
    assert res["d_int"] == 3000 and res["dims"] == [30, 300, 3000]
    res = ss.measure.intrinsic_dimension(dims=[10, 20], full_metric=0.8, refine=4, train=fake_train([]),
                                         progress=False)
    assert res["d_int"] is None and res["dims"] == [10, 20]
    for bad in ({"dims": [0, 10]}, {"threshold": 1.5}, {"refine": -1}):
        with pytest.raises(ss.SubspacesError):
            ss.measure.intrinsic_dimension(train=fake_train([]), progress=False, **bad)


def test_harness_configures_said_from_its_hyperparameters():
    """The dict intrinsic_dimension hands the harness (lr popped by finetune) attaches SAID, head trainable."""
    from conftest import bert_seqcls

    from subspaces.harness.finetune import configure

    clf = nn.Module()
    clf.encoder, clf.classifier = bert_seqcls().bert, nn.Linear(32, 2)
    configure(clf, "said", {"dim": 200, "targets": "all-linear", "projection": "fastfood", "seed": 0})
    body = sum(p.numel() for n, p in clf.named_parameters() if p.requires_grad and not n.startswith("classifier"))
    assert body == 200
