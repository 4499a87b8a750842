"""LoRA-LEGO (merge/lora_lego.py): the spec's faithful tests (methods/merge-lora-lego.md) on random factors, plus
heterogeneous-rank adapters merged end to end into a PEFT folder."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ids, llama_causal, logits, randomize_adapters

import subspaces as ss
from subspaces.merge import lora_cat, lora_lego
from subspaces.merge._lora import PREFIX, build
from subspaces.merge.lora_lego import canonical_units, kmeans, lego, rescale

D_IN, D_OUT = 12, 10


def lora(r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(r, D_IN, generator=g, dtype=torch.float64),
            torch.randn(D_OUT, r, generator=g, dtype=torch.float64))


def as_peft(A, B):
    return build({"layer": (A, B)})


def delta(result):
    sd = result.state_dict
    return sd[f"{PREFIX}layer.lora_B.weight"] @ sd[f"{PREFIX}layer.lora_A.weight"]


def test_msu_permutation_invariance_and_concatenation_is_summation():
    (A1, B1), (A2, B2) = lora(4, 0), lora(3, 1)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(B1[:, perm] @ A1[perm], B1 @ A1)
    cat = lora_cat([as_peft(A1, B1), as_peft(A2, B2)])
    assert cat.config["r"] == 7
    torch.testing.assert_close(delta(cat), B1 @ A1 + B2 @ A2)


@pytest.mark.parametrize("balance, canonical_sign", [(True, True), (False, False)])
def test_identity_merge(balance, canonical_sign):
    A, B = lora(4, 2)
    A2, B2, info = lego([A], [B], 4, balance=balance, canonical_sign=canonical_sign)
    assert info["rank"] == 4 and info["rho"] == 1.0
    torch.testing.assert_close(B2 @ A2, B @ A)
    merged = lora_lego([as_peft(A, B)], rank=4)
    torch.testing.assert_close(delta(merged), B @ A)


def test_duplicate_loras_average_not_sum():
    A, B = lora(5, 3)
    merged = lora_lego([as_peft(A, B), as_peft(A.clone(), B.clone())], rank=5)
    torch.testing.assert_close(delta(merged), B @ A)  # one copy, not 2·ΔW
    assert merged.report[0]["units"] == 10 and merged.report[0]["rank"] == 5


def test_parameter_reweighting_restores_the_mean_member_norm():
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [3.0, 3.0], [3.0, 3.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    C = torch.stack([X[:2].mean(0), X[2:].mean(0)])
    assert C[0].norm() < 1.0  # averaging non-parallel units shrinks the centroid (norm decay)
    R = rescale(C, X, labels)
    torch.testing.assert_close(R.norm(dim=1), torch.stack([X[:2].norm(dim=1).mean(), X[2:].norm(dim=1).mean()]))
    torch.testing.assert_close(R[1], C[1])  # identical members: a no-op
    torch.testing.assert_close(R[0] / R[0].norm(), C[0] / C[0].norm())  # direction kept


def test_sign_canonicalization_clusters_opposite_units_without_cancelling():
    A, B = lora(1, 4)
    a_flip, b_flip = canonical_units(-A, -B)
    a_same, b_same = canonical_units(A, B)
    torch.testing.assert_close(torch.cat([a_flip, b_flip.T], 1), torch.cat([a_same, b_same.T], 1))
    both = [as_peft(A, B), as_peft(-A, -B)]  # the same ΔW written with opposite signs
    torch.testing.assert_close(delta(lora_lego(both, rank=1)), B @ A)
    cancelled = lora_lego(both, rank=1, canonical_sign=False, balance=False)
    assert float(delta(cancelled).norm()) < 1e-12  # the paper's raw units average to zero


def test_shapes_with_heterogeneous_ranks_and_peft_round_trip(tmp_path):
    from peft import PeftModel

    base = llama_causal()
    paths = []
    for seed, r in ((1, 2), (2, 4), (3, 3)):
        m = copy.deepcopy(base)
        ss.adapt_(m, "lora", targets=["q_proj", "v_proj"], rank=r, alpha=2 * r)
        randomize_adapters(m, seed=seed, std=0.3)
        ss.save_adapter(m, tmp_path / f"l{seed}", format="peft")
        paths.append(tmp_path / f"l{seed}")
    out = tmp_path / "lego"
    assert ss.merge("lora_lego", models=paths, rank=5, out=out) == out
    merged = ss.merge("lora_lego", models=paths, rank=5)  # the same merge, in memory: state dict, config, report
    mods = dict(base.named_modules())
    for row in merged.report:
        w = mods[row["name"]].weight
        A = merged.state_dict[f"{PREFIX}{row['name']}.lora_A.weight"]
        B = merged.state_dict[f"{PREFIX}{row['name']}.lora_B.weight"]
        assert A.shape == (5, w.shape[1]) and B.shape == (w.shape[0], 5)
        assert row["rho"] == pytest.approx((3 / 5) ** 0.5)
    x = ids()
    ours = logits(ss.load_adapter(copy.deepcopy(base), out), x)
    theirs = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval(), x)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours, logits(base, x))


def test_kmeans_is_seeded_and_rank_pruning():
    A, B = lora(8, 5)
    X = torch.cat([A, B.T], 1)
    c1, l1 = kmeans(X, 3, seed=7)
    c2, l2 = kmeans(X, 3, seed=7)
    assert torch.equal(c1, c2) and torch.equal(l1, l2) and c1.shape == (3, D_IN + D_OUT)
    pruned = lora_lego([as_peft(A, B)], rank=3)  # a single LoRA, k < r: rank pruning
    assert pruned.state_dict[f"{PREFIX}layer.lora_A.weight"].shape == (3, D_IN)
    with pytest.raises(ss.SubspacesError, match="rank"):
        lora_lego([as_peft(A, B)], rank=0)
