"""AdaLoRA faithful tests (../shared/methods/adapter-increlora.md), including parity with PEFT's AdaLoRA."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import bert_seqcls, ids, logits

import subspaces as ss
from subspaces.adapters._core import DELTA, adapted_layers
from subspaces.adapters.adalora import AdaLoRA, budget_schedule, mask_to_budget

QV = ["query", "value"]


def ada_bert(**kw):
    base = bert_seqcls()
    m = copy.deepcopy(base)
    ss.adapt_(m, "adalora", targets=QV, **{"init_r": 4, "target_r": 2, "alpha": 32.0, **kw})
    return base, m


def deltas(m):
    return [layer._modules[DELTA] for _, layer in adapted_layers(m)]


def batch(i, n=4):
    return ids(n, 7, seed=100 + i), torch.arange(n) % 3


def test_zero_at_init_and_scaling_divides_by_ranknum():
    base, m = ada_bert()
    d = deltas(m)[0]
    assert torch.equal(d.weight(), torch.zeros_like(d.weight()))
    torch.testing.assert_close(logits(m, ids()), logits(base, ids()), atol=0, rtol=0)
    with torch.no_grad():
        d.E.normal_()
    expected = 32.0 / (4 + 1e-5) * d.B @ torch.diag(d.E) @ d.A
    torch.testing.assert_close(d.weight(), expected)
    x = torch.randn(3, 32)
    torch.testing.assert_close(d(x), x @ expected.T)


def test_budget_follows_the_cubic_schedule():
    b0, bT, ti, tf, T = 48, 16, 10, 20, 100
    assert budget_schedule(ti, b0, bT, ti, tf, T, 1) == (b0, False)  # warmup: full budget, no masking
    mid = ti + (T - tf - ti) // 2  # 1 - (t - t_init)/(T - t_final - t_init) = 1/2
    assert budget_schedule(mid, b0, bT, ti, tf, T, 1) == (int((b0 - bT) * 0.5**3 + bT), True)
    assert budget_schedule(T - tf, b0, bT, ti, tf, T, 1) == (bT, True)
    assert budget_schedule(T - tf + 5, b0, bT, ti, tf, T, 1) == (bT, True)
    t = ti + 7
    assert budget_schedule(t, b0, bT, ti, tf, T, 1)[0] == int((b0 - bT) * (1 - 7 / 70) ** 3 + bT)
    assert budget_schedule(ti + 3, b0, bT, ti, tf, T, 2)[1] is False  # masks every delta_t steps only


def test_triplet_score_by_hand_and_masking_keeps_exactly_the_budget():
    _, m = ada_bert()
    ds = deltas(m)
    g = torch.Generator().manual_seed(0)
    for d in ds:
        for p in (d.A, d.E, d.B):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g))
            p.grad = torch.randn(p.shape, generator=g)
    for d in ds:
        d.update_ipt(0.85, 0.85)
    d = ds[1]
    score = {}
    for name in ("A", "E", "B"):  # one EMA step from zero: Ī = 0.15 I, Ū = 0.15 |I - Ī|
        p = getattr(d, name)
        ipt = (p * p.grad).abs().detach()
        avg = 0.15 * ipt
        score[name] = avg * (0.15 * (ipt - avg).abs())
    by_hand = score["E"] + score["A"].mean(1) + score["B"].mean(0)
    torch.testing.assert_close(d.triplet_scores(), by_hand)
    all_scores = torch.cat([x.triplet_scores() for x in ds])
    budget = 11
    mask_to_budget(ds, budget)
    E = torch.cat([x.E.detach() for x in ds])
    assert int((E != 0).sum()) == budget == sum(x.rank for x in ds)
    assert set(torch.nonzero(E).flatten().tolist()) == set(all_scores.topk(budget).indices.tolist())
    assert all(x.ranknum.item() == 4 for x in ds)  # AdaLoRA keeps ranknum = init_r (PEFT, official)


def test_penalty_is_mean_orthogonality_residual():
    _, m = ada_bert(orth_reg_weight=0.3)
    mats = [(d.A @ d.A.T, d.B.T @ d.B) for d in deltas(m)]
    resid = [torch.linalg.matrix_norm(c - torch.eye(4)) for pair in mats for c in pair]
    torch.testing.assert_close(ss.adapters.penalty(m).detach(), 0.3 * torch.stack(resid).mean().detach())


def test_config_errors():
    with pytest.raises(ss.SubspacesError, match="target_r"):
        AdaLoRA(init_r=4, target_r=5)
    with pytest.raises(ss.SubspacesError, match="fraction"):
        AdaLoRA(tinit=1.5)
    with pytest.raises(ss.SubspacesError, match="budgeting phase"):
        AdaLoRA(tinit=5, tfinal=5, total_steps=10)
    assert AdaLoRA(total_steps=150).schedule() == (15, 75, 150)  # fractions of total_steps by default
    _, m = ada_bert()
    with pytest.raises(ss.SubspacesError, match="total_steps"):
        ss.adapters.step(m)


def run_ours(m, steps, lr=0.02):
    opt = torch.optim.Adam(ss.adapter_parameters(m), lr=lr)
    history = []
    for i in range(steps):
        x, y = batch(i)
        (m(input_ids=x, labels=y).loss + ss.adapters.penalty(m)).backward()
        opt.step()
        ss.adapters.step(m, optimizer=opt)
        opt.zero_grad()
        history.append([d.E.detach().clone() for d in deltas(m)])
    return history


def test_matches_peft_rank_allocator():
    """Same init copied into PEFT's AdaLoraModel: identical E (and so masks) over warmup, budget and final phases."""
    peft = pytest.importorskip("peft")
    T, kw = 12, dict(init_r=4, target_r=2, tinit=2, tfinal=4, total_steps=12, orth_reg_weight=0.5)
    base, m = ada_bert(**kw)
    pcfg = peft.AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=4, total_step=T, lora_alpha=32,
                              target_modules=QV, orth_reg_weight=0.5, beta1=0.85, beta2=0.85, deltaT=1)
    pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
    for name, layer in adapted_layers(m):
        d, p = layer._modules[DELTA], pm.base_model.model.get_submodule(name)
        with torch.no_grad():
            p.lora_A["default"].copy_(d.A)
            p.lora_B["default"].copy_(d.B)
            p.lora_E["default"].copy_(d.E[:, None])
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=0.02)
    theirs = []
    for i in range(T):
        x, y = batch(i)
        pm.base_model(input_ids=x, labels=y).loss.backward()  # AdaLoraModel.forward adds the orth. term
        opt.step()
        pm.base_model.update_and_allocate(i)
        opt.zero_grad()
        theirs.append([pm.base_model.model.get_submodule(n).lora_E["default"].detach().view(-1).clone()
                       for n, _ in adapted_layers(m)])
    ours = run_ours(m, T)
    for t, (a, b) in enumerate(zip(ours, theirs)):
        for ea, eb in zip(a, b):
            assert torch.equal(ea == 0, eb == 0), f"masks differ at step {t}"
            torch.testing.assert_close(ea, eb, atol=1e-6, rtol=1e-5)
    assert sum(int((e != 0).sum()) for e in ours[-1]) == 2 * 4  # target_r · #modules
    assert sum(int((e != 0).sum()) for e in ours[3]) > 2 * 4  # still pruning mid-schedule


def test_save_load_after_pruning_reproduces_outputs_and_ranks(tmp_path):
    base, m = ada_bert(tinit=1, tfinal=2, total_steps=8)
    run_ours(m, 8)
    ranks = [d.rank for d in deltas(m)]
    assert sum(ranks) == 8 and ranks == [int((d.E != 0).sum()) for d in deltas(m)]
    x = ids()
    ss.save_adapter(m, tmp_path / "a")
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, x), logits(m, x), atol=0, rtol=0)
    assert [d.rank for d in deltas(loaded)] == ranks and deltas(loaded)[0].t == 8
    report = ss.export_lora(m, tmp_path / "lora")
    assert [r["rank"] for r in report] == ranks  # the effective per-layer ranks (PEFT's rank_pattern)
    exported = ss.load_adapter(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(logits(exported, x), logits(m, x), atol=1e-5, rtol=0)
    run_ours(loaded, 2)  # the final phase continues after a reload: the mask is re-applied
    assert [d.rank for d in deltas(loaded)] == ranks
    assert [int((d.E != 0).sum()) for d in deltas(loaded)] == ranks


def test_runs_in_an_unmodified_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from subspaces.integrations.hf_trainer import AdapterSchedule

    _, m = ada_bert(tinit=1, tfinal=2, total_steps=8)
    data = [{"input_ids": ids(1, 6, seed=i)[0], "labels": torch.tensor(i % 3)} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    Trainer(model=m, args=args, train_dataset=data, callbacks=[AdapterSchedule()]).train()
    assert all(d.t == 8 for d in deltas(m))
    assert sum(int((d.E != 0).sum()) for d in deltas(m)) == 2 * 4
