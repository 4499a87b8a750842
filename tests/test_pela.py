"""PELA (arXiv 2310.10700): faithful tests 1–5 of methods/compress-pela.md plus distillation on tiny LLaMA."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import ids, llama_causal, state_snapshot
from torch import nn

import subspaces as ss
from subspaces.compress.pela import PELA, feature_loss, pela_loss, pela_rank, weight_pairs, weight_perturbation


class Net(nn.Module):
    """Linears named like a ViT/Swin: the skipped ones (norm, head, patch_embed, downsample, out < 10) and two kept."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Linear(12, 24)
        self.fc1 = nn.Linear(24, 40)
        self.fc2 = nn.Linear(40, 24)
        self.norm_proj = nn.Linear(24, 24)
        self.downsample = nn.Linear(24, 24)
        self.tiny = nn.Linear(24, 9)
        self.head = nn.Linear(24, 16)

    def forward(self, x):
        h = self.patch_embed(x)
        h = self.fc2(torch.relu(self.fc1(h)))
        h = self.downsample(self.norm_proj(h))
        return self.head(h) + self.tiny(h).sum(-1, keepdim=True)


def batch(n: int = 2, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def small_llama():
    return ss.models.tiny_llama(hidden_size=64, intermediate_size=172, num_hidden_layers=2)


# 1. rank formula and skip rules
@pytest.mark.parametrize("n,m,c", [(768, 768, 2), (768, 3072, 2), (3072, 768, 3), (64, 172, 1.5), (24, 40, 4 / 3),
                                   (10, 10, 7), (5, 3, 2.5)])
def test_rank_formula(n, m, c):
    r = pela_rank(n, m, c)
    assert r * (n + m) * c <= n * m < (r + 1) * (n + m) * c


def test_skip_rules_and_ratio_mapping():
    a, b = Net(), Net()
    b.load_state_dict(a.state_dict())
    rep = ss.compress_(a, "pela", ratio_c=2)
    kept = {"fc1": (24, 40), "fc2": (40, 24)}
    for name in ("patch_embed", "norm_proj", "downsample", "tiny", "head"):
        assert type(getattr(a, name)) is nn.Linear
    for name, (n, m) in kept.items():
        layer = getattr(a, name)
        assert isinstance(layer, ss.nn.LowRankLinear) and layer.rank == pela_rank(n, m, 2)
    assert rep["distilled"] is False and "SVD initialization only" in rep["note"]
    ss.compress_(b, "pela", ratio=0.5)  # fraction removed 0.5 ↔ c = 2
    assert {n: getattr(b, n).rank for n in kept} == {n: getattr(a, n).rank for n in kept}


# 2. init exactness
def test_init_full_rank_reproduces_and_truncated_equals_svd():
    torch.manual_seed(0)
    x = torch.randn(5, 12)
    full, ref = Net(), Net()
    ref.load_state_dict(full.state_dict())
    ss.compress_(full, "pela", rank={"fc1": 24, "fc2": 24})  # r = min(n, m)
    torch.testing.assert_close(full(x), ref(x), atol=1e-5, rtol=1e-5)

    low = copy.deepcopy(ref)
    ss.compress_(low, "pela", rank={"fc1": 5})
    W = ref.fc1.weight.detach().double()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(low.fc1.weight.double(), (U[:, :5] * S[:5]) @ Vh[:5], atol=1e-5, rtol=0)
    for factor in (low.fc1.down.weight, low.fc1.up.weight):  # balanced: each factor's singular values are √S
        torch.testing.assert_close(torch.linalg.svdvals(factor.double()), S[:5].sqrt(), atol=1e-5, rtol=0)
    torch.testing.assert_close(low.fc1.up.bias, ref.fc1.bias)


# 3. feature loss
def test_feature_loss_zero_for_identical_and_full_rank():
    teacher = llama_causal()
    parts = pela_loss(copy.deepcopy(teacher), teacher, ids(), task_loss=False, beta=1.0)
    assert parts["features"].item() == 0.0 and parts["logits"].item() == 0.0 and parts["loss"].item() == 0.0
    student = copy.deepcopy(teacher)
    ss.compress_(student, "pela", rank=32)  # every Linear of the tiny model at full rank
    assert pela_loss(student, teacher, ids(), task_loss=False)["features"].item() < 1e-10


def test_feature_loss_is_averaged_over_blocks():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 5, 8, generator=g) for _ in range(4)]
    s = [x + 0.3 for x in t]  # identical per-block error 0.09
    assert feature_loss(s[:2], t[:2]).item() == pytest.approx(0.09, rel=1e-5)
    assert feature_loss(s, t).item() == pytest.approx(0.09, rel=1e-5)
    s[0] = t[0] + 0.6  # one block's error 0.36: the mean moves by (0.36 − 0.09)/4
    assert feature_loss(s, t).item() == pytest.approx(0.09 + 0.27 / 4, rel=1e-5)


# 4. weight-perturbation regularizer
def test_regularizer_is_max_abs_minus_eps_squared_with_grads_on_both_factors():
    torch.manual_seed(0)
    layers, origs, expect = [], [], []
    for out, inp in ((6, 5), (4, 7)):
        m = ss.nn.LowRankLinear(inp, out, 2)
        w = torch.randn(out, inp)
        layers.append(m)
        origs.append(w)
        expect.append(((m.up.weight @ m.down.weight - w).abs().max().item() - 0.01) ** 2)
    reg = weight_perturbation(list(zip(layers, origs)), eps=0.01)
    assert reg.item() == pytest.approx(sum(expect) / 2, rel=1e-6)
    reg.backward()
    for m in layers:
        assert m.up.weight.grad.abs().sum() > 0 and m.down.weight.grad.abs().sum() > 0


def test_regularizer_pairs_come_from_teacher_weights():
    teacher = llama_causal()
    student = copy.deepcopy(teacher)
    ss.compress_(student, "pela", ratio_c=2)
    pairs = weight_pairs(student, teacher)
    assert len(pairs) == 14  # 7 Linears per block, 2 blocks
    m, w = pairs[0]
    assert w is teacher.model.layers[0].self_attn.q_proj.weight.detach() or torch.equal(
        w, teacher.model.layers[0].self_attn.q_proj.weight)
    assert m is student.model.layers[0].self_attn.q_proj


# 5. teacher frozen
def test_teacher_frozen_during_distillation():
    teacher = llama_causal()  # left trainable on purpose: the teacher runs under no_grad
    student = copy.deepcopy(teacher)
    ss.compress_(student, "pela", ratio_c=2)
    before_t, before_s = state_snapshot(teacher), state_snapshot(student)
    cfg = PELA(ratio_c=2, steps=3, lr=1e-2, beta=1.0, reg_weight=1.0)
    cfg.distill(student, teacher, [ids(seed=1), ids(seed=2)])
    after_t = teacher.state_dict()
    assert all(torch.equal(before_t[k], after_t[k]) for k in before_t)
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert any(not torch.equal(before_s[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())  # no grads left behind


def test_compress_model_distillation_lowers_feature_loss():
    model = small_llama()
    rep = ss.compress_(model, "pela", ratio=0.5, calibration=[batch()], steps=20, lr=2e-3, task_loss=False)
    assert rep["distilled"] and rep["distill_steps"] == 20
    assert rep["distill_features_last"] < 0.7 * rep["distill_features_first"]
    assert rep["distill_loss_first"] == pytest.approx(rep["distill_features_first"])
    assert 0.45 < rep["ratio"] < 0.55
    assert all(isinstance(model.get_submodule(r["name"]), ss.nn.LowRankLinear) for r in rep["layers"])
    assert all(p.requires_grad for p in model.parameters())


def test_task_loss_and_regularizer_enter_the_objective():
    teacher = small_llama().eval()
    student = copy.deepcopy(teacher)
    ss.compress_(student, "pela", ratio_c=2)
    parts = pela_loss(student, teacher, batch(), alpha=1.0, beta=0.5, reg_weight=2.0, eps=1e-3)
    assert parts["task"].item() > 1.0  # random byte LM: cross-entropy ≈ log 256
    assert parts["reg"].item() > 0
    total = parts["task"] + parts["features"] + 0.5 * parts["logits"] + 2.0 * parts["reg"]
    assert parts["loss"].item() == pytest.approx(total.item(), rel=1e-6)
    out = student(input_ids=batch(), labels=batch())
    assert parts["task"].item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_bf16_model():
    model = small_llama().to(torch.bfloat16)
    rep = ss.compress_(model, "pela", ratio_c=2, calibration=[batch()], steps=3, beta=1.0, reg_weight=1.0,
                       progress=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(rep[k])) for k in ("distill_loss_first", "distill_loss_last"))
    assert torch.isfinite(model(input_ids=batch()).logits.float()).all()


def test_rank_and_energy_options():
    model = small_llama()
    ss.compress_(model, "pela", rank=8)
    assert model.model.layers[0].mlp.up_proj.rank == 8
    model = small_llama()
    rep = ss.compress_(model, "pela", ratio=0.5, allocation="energy")
    assert rep["ratio"] >= 0.45 and rep["ratio_c"] == 2.0
    model = small_llama()
    rep2 = ss.compress_(model, "pela", ratio_c=2, allocation="energy")  # c ↔ ratio 1 − 1/c
    assert [r["rank"] for r in rep2["layers"]] == [r["rank"] for r in rep["layers"]]


@pytest.mark.parametrize("kwargs,field", [
    ({"ratio_c": 1.0}, "ratio_c"), ({"ratio_c": 2, "ratio": 0.5}, "exactly one"), ({}, "exactly one"),
    ({"ratio_c": 2, "svd": "qr"}, "svd"), ({"ratio_c": 2, "steps": -1}, "steps"),
    ({"ratio_c": 2, "alpha": -1}, "alpha"),
    ({"ratio_c": 1000}, "no targeted Linear"), ({"ratio": 1.5}, "ratio")])
def test_bad_input(kwargs, field):
    with pytest.raises(ss.SubspacesError, match=field):
        ss.compress_(Net(), "pela", **kwargs)


def test_alpha_needs_hidden_states():
    teacher = Net()
    student = copy.deepcopy(teacher)
    x = torch.randn(2, 12)
    with pytest.raises(ss.SubspacesError, match="hidden_states"):
        pela_loss(student, teacher, {"x": x})
    assert pela_loss(student, teacher, {"x": x}, alpha=0.0, beta=1.0)["loss"].item() == 0.0
