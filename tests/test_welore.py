"""WeLore (arXiv 2407.11239): the faithful tests of methods/optim-welore.md, plus tiny LLaMA / BERT runs."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.models import tiny_llama
from subspaces.nn import LowRankLinear
from subspaces.optim.welore import WeLore, pruned_count, welore_, welore_ranks

from conftest import bert_seqcls, ids


def _spectra(n: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random decaying spectra of varied lengths (distinct values with probability 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        d = 20 + 7 * i
        out[f"w{i}"] = torch.sort(torch.rand(d, generator=g, dtype=torch.float64) ** (1 + i), descending=True).values
    return out


def _set_spectrum(lin: nn.Linear, S: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m, n = lin.weight.shape
    U = torch.linalg.qr(torch.randn(m, len(S), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(S), generator=g, dtype=torch.float64)).Q
    with torch.no_grad():
        lin.weight.copy_((U * S) @ V.T)


def _decaying_llama() -> tuple[nn.Module, dict[str, float]]:
    """tiny_llama whose block Linears have spectra σ_i = exp(−r·i/d) with a decay r that varies per matrix."""
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    rates = {}
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    for j, (name, lin) in enumerate(linears):
        d = min(lin.weight.shape)
        rates[name] = 0.5 + 1.5 * j  # 0.5 (nearly flat) .. 20 (steep)
        _set_spectrum(lin, torch.exp(-rates[name] * torch.arange(d, dtype=torch.float64) / d), seed=j)
    return model, rates


# 1. normalization / threshold ---------------------------------------------------------------------------------------

def test_pruned_count_is_count_below_tau_of_minmax_normalized():
    S = torch.tensor([10.0, 7.0, 4.0, 3.0, 2.5, 1.0])
    normed = (S - 1.0) / 9.0  # 1, .667, .333, .222, .167, 0
    for tau in (0.1, 0.2, 0.25, 0.5, 0.9, 1.0):
        assert pruned_count(S, tau) == int((normed < tau).sum())
    assert pruned_count(S, 0.2) == 2 and pruned_count(S, 0.5) == 4
    assert pruned_count(S, 0.0) == pruned_count(S, -3.0) == 0          # τ ≤ 0 prunes nothing
    for tau in (1e-12, 0.01):
        assert pruned_count(S, tau) == 1                                 # σ̂_min = 0 always goes first
    assert pruned_count(S, 1.5) == len(S) - 1                            # τ > 1: clamped, k ≥ 1
    assert pruned_count(torch.full((5,), 3.0), 0.5) == 0                 # flat spectrum: no tail


def test_ranks_clamped_at_one():
    spectra = {"a": torch.tensor([1.0, 1e-9, 0.0]), "b": torch.tensor([1.0, 0.0])}
    tau, ranks, lrc = welore_ranks(spectra, 0.99)
    assert tau <= 1.0 and ranks == {"a": 1, "b": 1} and all(lrc.values())


def test_budget_tie_goes_to_the_smaller_reduction():
    # Σd = 3, ρ·Σd = 1.5: pruning 1 or 2 is equally close; WeLore keeps the larger rank
    tau, ranks, _ = welore_ranks({"a": torch.tensor([1.0, 0.5, 0.0])}, 0.5)
    assert ranks == {"a": 2} and tau == 0.5
    assert welore_ranks({"a": torch.tensor([1.0, 0.5, 0.0])}, 0.51)[1] == {"a": 1}


# 2. global budget ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rho", [0.1, 0.25, 0.5, 0.7, 0.9])
def test_budget_within_one_singular_value(rho):
    spectra = _spectra()
    total = sum(s.numel() for s in spectra.values())
    tau, ranks, _ = welore_ranks(spectra, rho)
    pruned = sum(s.numel() - ranks[n] for n, s in spectra.items())
    assert abs(pruned - rho * total) <= 1.0
    assert pruned == sum(pruned_count(s, tau) for s in spectra.values())  # τ reproduces the counts


def test_rho_to_tau_is_monotone_and_zero_prunes_nothing():
    spectra = _spectra(seed=3)
    taus = [welore_ranks(spectra, rho)[0] for rho in torch.linspace(0, 0.95, 40).tolist()]
    assert all(a <= b for a, b in zip(taus, taus[1:])) and taus[-1] > taus[0]
    tau, ranks, lrc = welore_ranks(spectra, 0.0)
    assert tau <= 0 and all(ranks[n] == s.numel() for n, s in spectra.items()) and not any(lrc.values())


def test_ranks_are_non_uniform_for_different_decays():
    d = 64
    i = torch.arange(d, dtype=torch.float64)
    spectra = {"flat": 1.0 - 0.5 * i / d, "steep": torch.exp(-10 * i / d), "steeper": torch.exp(-30 * i / d)}
    _, ranks, _ = welore_ranks(spectra, 0.5)
    assert ranks["flat"] > ranks["steep"] > ranks["steeper"]


# 3. factor correctness ----------------------------------------------------------------------------------------------

def test_lrc_factors_are_truncated_svd_and_balanced():
    model, _ = _decaying_llama()
    originals = {n: m.weight.detach().double().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    report = welore_(model, reduction=0.5)
    assert abs(report["reduction"] - 0.5) <= 1 / sum(r["d"] for r in report["layers"])
    checked = 0
    for row in report["layers"]:
        layer = model.get_submodule(row["name"])
        if not row["lrc"]:
            continue
        checked += 1
        assert isinstance(layer, LowRankLinear) and layer.rank == row["rank"]
        U, S, Vh = torch.linalg.svd(originals[row["name"]], full_matrices=False)
        k = row["rank"]
        torch.testing.assert_close(layer.weight.double(), (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-5, rtol=0)
        # balanced: both factors carry S^½, so their Gram matrices share the spectrum S_k
        torch.testing.assert_close(torch.linalg.svdvals(layer.up.weight.double()) ** 2, S[:k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.linalg.svdvals(layer.down.weight.double()) ** 2, S[:k], atol=1e-5, rtol=1e-5)
    assert checked > 0


def test_full_rank_factorization_is_exact():
    lin = nn.Linear(12, 9)
    full = LowRankLinear.from_linear(lin, 9)
    x = torch.randn(4, 12)
    torch.testing.assert_close(full.weight, lin.weight, atol=1e-5, rtol=0)
    torch.testing.assert_close(full(x), lin(x), atol=1e-5, rtol=0)


# 4. trainability ----------------------------------------------------------------------------------------------------

def test_only_lrc_factors_train_and_state_is_2_sum_k_m_plus_n():
    model, _ = _decaying_llama()
    opt = ss.optim.setup_(model, "welore", lr=1e-3, reduction=0.5, min_ratio=0.3)
    rows = opt.report["layers"]
    assert any(r["lrc"] for r in rows) and not all(r["lrc"] for r in rows)
    expected = {f"{r['name']}.{p}.weight" for r in rows if r["lrc"] for p in ("down", "up")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected  # LRC bias, N-LRCs, rest frozen
    x = ids(length=8)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    n_state = 2 * sum(r["rank"] * sum(r["shape"]) for r in rows if r["lrc"])
    assert ss.optim.expected_state_bytes(opt) == ss.optim.state_bytes(opt) == n_state * 4


# 5. min_ratio split -------------------------------------------------------------------------------------------------

def test_min_ratio_keeps_mildly_reduced_matrices_dense():
    model, rates = _decaying_llama()
    dense_before = copy.deepcopy(model)
    report = welore_(model, reduction=0.5, min_ratio=0.4)
    rows = {r["name"]: r for r in report["layers"]}
    _, ranks, _ = welore_ranks({n: ss.measure.spectrum(m.weight) for n, m in dense_before.named_modules()
                                if n in rows}, 0.5)
    for name, row in rows.items():
        ratio = 1 - ranks[name] / row["d"]
        assert row["lrc"] == (ratio > 0.4)
        layer = model.get_submodule(name)
        if row["lrc"]:
            assert isinstance(layer, LowRankLinear)
        else:  # unchanged and frozen
            assert type(layer) is nn.Linear and row["rank"] == row["d"] and not layer.weight.requires_grad
            assert torch.equal(layer.weight, dense_before.get_submodule(name).weight)
    assert 0 < sum(r["lrc"] for r in rows.values()) < len(rows)
    # the steep decays are the LRCs
    lrc_rates = [rates[n] for n, r in rows.items() if r["lrc"]]
    dense_rates = [rates[n] for n, r in rows.items() if not r["lrc"]]
    assert min(lrc_rates) > max(dense_rates)


# models and training ------------------------------------------------------------------------------------------------

def test_decaying_llama_gets_non_uniform_ranks_ordered_by_decay():
    model, rates = _decaying_llama()
    rows = welore_(model, reduction=0.5)["layers"]
    by_rate = sorted(rows, key=lambda r: rates[r["name"]])
    kept = [r["rank"] / r["d"] for r in by_rate]
    assert all(a >= b for a, b in zip(kept, kept[1:])) and kept[0] - kept[-1] > 0.5


def test_random_tiny_llama_conversion_and_targets():
    model = tiny_llama(hidden_size=64, intermediate_size=128)
    report = welore_(model, reduction=0.5)
    names = [r["name"] for r in report["layers"]]
    assert len(names) == 14 and all(".self_attn." in n or ".mlp." in n for n in names)  # lm_head untouched
    assert abs(report["reduction"] - 0.5) <= 1 / 896 and 0 < report["tau"] < 1
    x = ids(length=8)
    assert torch.isfinite(model(input_ids=x).logits).all()


def test_bert_default_targets_are_block_linears_and_lrc_bias_stays_frozen():
    model = bert_seqcls()
    x = ids()
    ref = model(input_ids=x).logits
    report = welore_(model, reduction=0.3)
    names = {r["name"].split("encoder.layer.0.")[-1] for r in report["layers"] if ".layer.0." in r["name"]}
    assert names == {"attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense", "intermediate.dense", "output.dense"}
    assert all("pooler" not in r["name"] and "classifier" not in r["name"] for r in report["layers"])
    lrcs = [r for r in report["layers"] if r["lrc"]]
    assert lrcs and all(model.get_submodule(r["name"]).up.bias is not None for r in lrcs)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{r['name']}.{p}.weight" for r in lrcs for p in ("down", "up")}
    assert all(r["params_after"] == r["rank"] * sum(r["shape"]) + r["shape"][0] for r in lrcs)
    assert model(input_ids=x).logits.shape == ref.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_setup_trains_a_few_steps(dtype):
    model = tiny_llama(hidden_size=64, intermediate_size=128).to(dtype)
    opt = ss.optim.setup_(model, "welore", lr=1e-3, reduction=0.5)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert all(p.dtype == dtype for p in trainable.values())
    x = ids(batch=4, length=16)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], v) for n, v in trainable.items())
    assert all(torch.equal(params[n], v) for n, v in frozen.items())


def test_validation_and_registry():
    assert ss.optim.config_for("welore") == WeLore()
    for bad in ({"reduction": 1.0}, {"reduction": -0.1}, {"min_ratio": 1.0}, {"reduction": True}, {"targets": []}):
        with pytest.raises(SubspacesError):
            WeLore(**bad)
    assert WeLore(targets=["q_proj"]).targets == ("q_proj",)
    with pytest.raises(SubspacesError, match="match no nn.Linear"):
        welore_(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(SubspacesError, match="nothing is trainable"):
        ss.optim.setup_(tiny_llama(hidden_size=32, intermediate_size=64), "welore", lr=1e-3, reduction=0.0)
    with pytest.raises(SubspacesError):
        welore_ranks({"a": torch.tensor([1.0, float("nan")])}, 0.5)
