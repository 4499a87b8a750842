"""EoRA (arXiv 2410.21271): the faithful tests of methods/compress-eora.md, the RTN / magnitude baselines, the PEFT
export of a compensated quantized model and the registry entry."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import subspaces as ss
from subspaces._errors import SubspacesError
from subspaces.compress import EoRA, eora, eora_, eora_delta, prune_magnitude_, quantize_rtn_
from subspaces.compress._quantize import rtn
from subspaces.nn import LowRankLinear

D64 = torch.float64


def model(seed: int = 0):
    return ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=seed).eval()


def batches(n: int = 3, seed: int = 1, length: int = 16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, length), generator=g) for _ in range(n)]


def spd(n: int, seed: int, spread: float = 4.0) -> torch.Tensor:
    """A random SPD matrix with eigenvalues spread over ``spread`` decades (anisotropic)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D64)).Q
    return (Q * torch.logspace(0, -spread, n, dtype=D64)) @ Q.T


def sqrtm(C: torch.Tensor) -> torch.Tensor:
    lam, Q = torch.linalg.eigh(C)
    return (Q * lam.clamp_min(0).sqrt()) @ Q.T


def svd_comp(dW: torch.Tensor, r: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vh[:r]


# ------------------------------------------------------------------ the baselines


@pytest.mark.parametrize("bits,group,d_in", [(4, 16, 40), (8, 128, 48), (3, None, 20)])
def test_rtn_grid_and_error_bound(bits, group, d_in):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(7, d_in, generator=g) * torch.rand(7, 1, generator=g)
    Q = rtn(W, bits, group)
    assert Q.dtype == W.dtype and Q.shape == W.shape
    size = d_in if group is None else group
    for start in range(0, d_in, size):
        w, q = W[:, start:start + size], Q[:, start:start + size]
        scale = (w.amax(1) - w.amin(1)) / (2 ** bits - 1)
        for row in range(7):
            assert len(torch.unique(q[row])) <= 2 ** bits
        assert ((w - q).abs() <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7).all()
    assert not torch.equal(Q, W)


def test_quantize_rtn_model_in_place_keeps_dtype_and_reports():
    m = model().to(torch.bfloat16)
    before = m.model.layers[0].mlp.up_proj.weight.clone()
    rep = quantize_rtn_(m, bits=4, group_size=16)
    w = m.model.layers[0].mlp.up_proj.weight
    assert w.dtype == torch.bfloat16 and not torch.equal(w, before)
    assert len(torch.unique(w[0, :16].float())) <= 16
    assert len(rep["layers"]) == 14 and rep["bits_per_weight"] == pytest.approx(4 + 20 / 16)
    assert torch.equal(m.lm_head.weight, m.model.embed_tokens.weight)  # the head (tied) is not targeted
    with pytest.raises(SubspacesError, match="bits"):
        quantize_rtn_(m, bits=0)
    with pytest.raises(SubspacesError, match="group_size"):
        quantize_rtn_(m, group_size=0)


def test_magnitude_pruning_exact_sparsity():
    m = model()
    rep = prune_magnitude_(m, sparsity=0.3)
    for row in rep["layers"]:
        W = m.get_submodule(row["name"]).weight
        k = round(0.3 * W.numel())
        assert int((W == 0).sum()) == k and row["sparsity"] == k / W.numel()
        kept = W[W != 0].abs().min()
        orig = model().get_submodule(row["name"]).weight
        assert (orig[W == 0].abs() <= kept).all()  # the smallest magnitudes went
    with pytest.raises(SubspacesError, match="sparsity"):
        prune_magnitude_(m, sparsity=1.0)


# ------------------------------------------------------------------ faithful tests 1-5 (the closed form)


@pytest.mark.parametrize("shape", [(6, 9), (9, 6)])
def test_1_full_rank_exactness(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g, dtype=D64)
    Wc = rtn(W, 2, None)
    B, A = eora_delta(W - Wc, spd(shape[1], 1), min(shape))
    torch.testing.assert_close(Wc + B @ A, W, atol=1e-10, rtol=0)


def test_2_optimality_and_paper_formula():
    g = torch.Generator().manual_seed(2)
    dW, C, r = torch.randn(8, 12, generator=g, dtype=D64), spd(12, 3), 3
    root = sqrtm(C)
    B, A = eora_delta(dW, C, r)
    eora_err = ((dW - B @ A) @ root).square().sum()
    s = torch.linalg.svdvals(dW @ root)
    torch.testing.assert_close(eora_err, s[r:].square().sum(), rtol=1e-9, atol=0)
    svd_err = ((dW - svd_comp(dW, r)) @ root).square().sum()
    assert eora_err < 0.9 * svd_err
    # The paper's A = S^½ Vᵀ Λ^-½ Qᵀ gives the same factors as the implemented S^-½ Uᵀ ΔW.
    lam, Q = torch.linalg.eigh(C)
    U, S, Vh = torch.linalg.svd(dW @ (Q * lam.sqrt()), full_matrices=False)
    torch.testing.assert_close(B, U[:, :r] * S[:r].sqrt())
    torch.testing.assert_close(A, (S[:r].sqrt()[:, None] * Vh[:r]) / lam.sqrt() @ Q.T)


def test_3_isotropic_inputs_give_plain_svd():
    g = torch.Generator().manual_seed(4)
    dW = torch.randn(10, 7, generator=g, dtype=D64)
    B, A = eora_delta(dW, 2.5 * torch.eye(7, dtype=D64), 3)
    torch.testing.assert_close(B @ A, svd_comp(dW, 3))


def test_4_held_out_output_error_beats_svd_compensation():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(16, 24, generator=g, dtype=D64)
    dW = W - rtn(W, 3, 8)
    mix = torch.randn(24, 24, generator=g, dtype=D64) * torch.logspace(0, -2, 24, dtype=D64)  # anisotropic inputs
    X_cal, X_test = (torch.randn(n, 24, generator=g, dtype=D64) @ mix.T for n in (400, 400))
    B, A = eora_delta(dW, X_cal.T @ X_cal / 400, 4)
    e = ((dW - B @ A) @ X_test.T).norm()
    s = ((dW - svd_comp(dW, 4)) @ X_test.T).norm()
    assert e < 0.95 * s and e < (dW @ X_test.T).norm()


def test_5_zero_error_is_a_no_op():
    B, A = eora_delta(torch.zeros(5, 8, dtype=D64), spd(8, 6), 3)
    assert torch.count_nonzero(B @ A) == 0
    m, data = model(), batches()
    ref = model()
    rep = eora_(m, ref, data, rank=2)
    with torch.no_grad():
        assert torch.equal(m(data[0]).logits, ref(data[0]).logits)
    assert all(r["output_error"] == 0.0 for r in rep["layers"])


def test_rank_deficient_calibration_stays_finite():
    """Fewer calibration tokens than input features: C is singular; B A stays a bounded projection of ΔW."""
    g = torch.Generator().manual_seed(7)
    dW, X = torch.randn(6, 20, generator=g, dtype=D64), torch.randn(5, 20, generator=g, dtype=D64)
    B, A = eora_delta(dW, X.T @ X / 5, 5)
    assert torch.isfinite(A).all() and (B @ A).norm() <= dW.norm() * (1 + 1e-9)
    torch.testing.assert_close((B @ A) @ X.T, dW @ X.T)  # rank(C) = 5: exact on the calibration inputs


# ------------------------------------------------------------------ on models


def test_6_compensated_blocks_feed_the_next(monkeypatch):
    ref, data = model(), batches()
    m = copy.deepcopy(ref)
    quantize_rtn_(m, bits=3, group_size=16)
    plain = copy.deepcopy(m)
    seen = {}
    real = eora.eora_delta

    def spy(dW, C, rank, **kw):
        seen[len(seen)] = C
        return real(dW, C, rank, **kw)

    monkeypatch.setattr(eora, "eora_delta", spy)
    rep = eora_(m, ref, data, rank=4)
    name = "model.layers.1.self_attn.q_proj"
    C_used = seen[[r["name"] for r in rep["layers"]].index(name)]

    def moment(net):
        xs = []
        h = net.get_submodule(name).register_forward_hook(lambda mod, a, o: xs.append(a[0].reshape(-1, 32)))
        with torch.no_grad():
            for b in data:
                net(b)
        h.remove()
        X = torch.cat(xs).double()
        return X.T @ X / X.shape[0]

    torch.testing.assert_close(C_used, moment(m), rtol=1e-5, atol=1e-7)  # the compensated block 0's outputs
    assert (C_used - moment(plain)).abs().max() > 1e-4  # not the uncompensated ones


def test_rtn4_compensation_reduces_held_out_loss_and_exports_to_peft(tmp_path):
    """On a random tiny LLaMA the LM loss barely moves at 4 bits, so the loss is the KL to the uncompressed
    model's predictions on held-out batches (and each layer's output error)."""
    peft = pytest.importorskip("peft")
    ref, cal, held = model(), batches(4, seed=1), batches(3, seed=99)
    m = copy.deepcopy(ref)
    quantize_rtn_(m, bits=4, group_size=16)
    base = copy.deepcopy(m)
    rep = eora_(m, ref.state_dict(), cal, rank=4)
    assert all(r["output_error"] < r["output_error_before"] for r in rep["layers"])

    def kl(net):
        with torch.no_grad():
            return sum(F.kl_div(net(b).logits.log_softmax(-1), ref(b).logits.log_softmax(-1), log_target=True,
                                reduction="batchmean") for b in held)

    assert kl(m) < 0.8 * kl(base)
    ss.export_lora(m, tmp_path / "eora")
    loaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "eora")).eval()
    with torch.no_grad():
        for b in held:
            torch.testing.assert_close(loaded(b).logits, m(b).logits, atol=1e-5, rtol=1e-5)


def test_lowrank_layers_grow_by_the_eora_rank():
    ref, data = model(), batches()
    m = copy.deepcopy(ref)
    ss.compress_(m, "svd", rank=8)
    name = "model.layers.0.mlp.down_proj"
    Wc = m.get_submodule(name).weight.detach().double()
    rep = eora_(m, ref, data, rank=3, targets=["down_proj"])
    layer = m.get_submodule(name)
    assert isinstance(layer, LowRankLinear) and layer.rank == 11
    row = rep["layers"][0]
    assert row["params_added"] == 3 * (32 + 64) and row["output_error"] < row["output_error_before"]
    W = ref.get_submodule(name).weight.double()
    assert (W - layer.weight.double()).norm() < (W - Wc).norm()


@pytest.mark.parametrize("base,kw", [("rtn4", {}), ("magnitude", {"ratio": 0.5}), ("svd", {"ratio": 0.3})])
def test_registry_entry_counts_eora_parameters(base, kw):
    m, data = model(), batches()
    rep = ss.compress_(m, EoRA(rank=4, base=base, group_size=16), calibration=data, **kw)
    rows = rep["layers"]
    assert rep["method"] == "eora" and rep["base_report"]["method"].startswith(base[:3]) and len(rows) == 14
    assert rep["eora_params"] == sum(4 * sum(r["shape"]) for r in rows)
    assert rep["params_after"] == sum(r["params_after"] for r in rows)
    assert rep["params_after"] == rep["base_report"]["params_after"] + rep["eora_params"]
    assert all(r["output_error"] < r["output_error_before"] for r in rows)
    with torch.no_grad():
        assert torch.isfinite(m(data[0]).logits).all()


def test_bf16_model_and_bad_inputs():
    m, data = model().to(torch.bfloat16), batches(2)
    rep = ss.compress_(m, "eora", base="rtn4", group_size=16, calibration=data)
    assert m.model.layers[0].self_attn.q_proj.delta.A.dtype == torch.float32
    assert all(r["output_error"] < r["output_error_before"] for r in rep["layers"])
    with pytest.raises(SubspacesError, match="base="):
        EoRA(base="gptq")
    with pytest.raises(SubspacesError, match="rank"):
        EoRA(rank=0)
    with pytest.raises(SubspacesError, match="ratio"):
        ss.compress_(model(), "eora", base="rtn4", ratio=0.2, calibration=data)
    with pytest.raises(SubspacesError, match="calibration"):
        ss.compress_(model(), "eora", ratio=0.2)
    with pytest.raises(SubspacesError, match="must be <"):
        eora_(model(), model(), data, rank=32)
    with pytest.raises(SubspacesError, match="reference has no weight"):
        eora_(model(), {}, data, rank=2)
