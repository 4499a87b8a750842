"""IncreLoRA faithful tests (../shared/methods/adapter-increlora.md)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import bert_seqcls, ids, logits
from torch import nn

import subspaces as ss
from subspaces.adapters._core import DELTA, adapted_layers
from subspaces.adapters.increlora import IncreLoRA

QV = ["query", "value"]  # 4 modules in the tiny BERT


def inc_bert(**kw):
    base = bert_seqcls()
    m = copy.deepcopy(base)
    ss.adapt_(m, "increlora", targets=QV, **{"init_warmup": 0, "incre_interval": 1, **kw})
    return base, m


def deltas(m):
    return [layer._modules[DELTA] for _, layer in adapted_layers(m)]


def train_step(m, opt, i, *, schedule=True):
    m.train()
    x = ids(4, 7, seed=100 + i)
    (m(input_ids=x, labels=torch.arange(4) % 3).loss + ss.adapters.penalty(m)).backward()
    opt.step()
    if schedule:
        ss.adapters.step(m, optimizer=opt)
    opt.zero_grad()
    m.eval()


def by_hand(d):
    A = torch.cat(list(d.A))
    E = torch.cat(list(d.E))
    B = torch.cat(list(d.B), dim=1)
    return d.config.alpha / (d.ranknum + 1e-5) * B @ torch.diag(E) @ A


def test_zero_at_init_and_scaling_follows_ranknum():
    base, m = inc_bert()
    d = deltas(m)[0]
    assert torch.equal(d.weight(), torch.zeros_like(d.weight()))
    torch.testing.assert_close(logits(m, ids()), logits(base, ids()), atol=0, rtol=0)
    assert len(d.A) == 2 and d.ranknum.item() == 1  # the rank-1 block and one reserve (add_r = 1)
    with torch.no_grad():
        d.E[0].normal_()
    torch.testing.assert_close(d.weight(), by_hand(d))
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=1e-2)
    train_step(m, opt, 0)
    train_step(m, opt, 1)  # t = 1: top_h = 2 modules grow
    grown = [x for x in deltas(m) if x.ranknum.item() == 2]
    assert len(grown) == 2
    torch.testing.assert_close(grown[0].weight(), by_hand(grown[0]))  # now divided by ranknum 2


def test_growth_picks_top_h_by_score_within_budget_and_feeds_the_optimizer():
    _, m = inc_bert()
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=1e-2)
    train_step(m, opt, 0)
    assert all(int(d.ranknum) == 1 for d in deltas(m))
    before = {id(p) for g in opt.param_groups for p in g["params"]}
    train_step(m, opt, 1)
    scores = torch.stack([d.importance() for d in deltas(m)])  # the scores the allocation used
    grown = [i for i, d in enumerate(deltas(m)) if int(d.ranknum) == 2]
    assert sorted(grown) == sorted(scores.topk(2).indices.tolist())
    after = [p for g in opt.param_groups for p in g["params"]]
    new = [p for p in after if id(p) not in before]
    for i in grown:  # the switched-on e and the fresh reserve's a, b; all in the existing group
        d = deltas(m)[i]
        assert {id(d.E[1]), id(d.A[2]), id(d.B[2])} <= {id(p) for p in new}
        assert d.E[1].requires_grad and not d.E[2].requires_grad and d.E[2].item() == pytest.approx(1e-5)
    assert len(opt.param_groups) == 1 and len(new) == 3 * 2
    totals = []
    for i in range(2, 6):
        train_step(m, opt, i)
        totals.append(sum(int(d.ranknum) for d in deltas(m)))
    assert totals == [8, 8, 8, 8]  # target_rank 2 × 4 modules, never beyond
    assert all(not d.growing and all(e.item() == 0 for e in d.E[1 + d.rank - 1:]) for d in deltas(m))
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in ss.adapter_parameters(m)} <= in_opt  # every trainable tensor reached the optimizer


def test_budget_is_never_exceeded_when_add_r_overshoots():
    _, m = inc_bert(target_rank=2, add_r=3, top_h=2)  # budget 8, start 4: the code would reach 10
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=1e-2)
    for i in range(3):
        train_step(m, opt, i)
    ranks = sorted(int(d.ranknum) for d in deltas(m))
    assert ranks == [1, 1, 2, 4] and sum(ranks) == 8


def test_reserves_learn_in_advance_with_frozen_tiny_e():
    _, m = inc_bert()
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=1e-2)
    d = deltas(m)[0]
    assert d.E[1].item() == 0 and not d.E[1].requires_grad  # no effect before the first step()
    train_step(m, opt, 0)  # t = 0: advance learning starts
    assert d.E[1].item() == pytest.approx(1e-5)
    a0 = d.A[1].detach().clone()
    m.train()
    m(input_ids=ids(4, 7, seed=3), labels=torch.arange(4) % 3).loss.backward()
    assert d.A[1].grad.abs().sum() > 0 and d.B[1].grad.abs().sum() > 0
    assert d.E[1].grad is None and not d.E[1].requires_grad
    opt.step()
    assert not torch.equal(d.A[1].detach(), a0) and d.E[1].item() == pytest.approx(1e-5)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        return self.fc(x)


def test_importance_score_matches_the_formula_by_hand():
    torch.manual_seed(0)
    m = Toy()
    ss.adapt_(m, "increlora", targets=["fc"], rank=2, target_rank=4)
    d = m.fc._modules[DELTA]
    with torch.no_grad():
        for e in d.E:
            e.normal_()
    x = torch.randn(5, 8)
    m.train()
    out = m(x)
    out.pow(2).sum().backward()
    dw = by_hand(d).detach()  # (d_out, d_in)
    G = 2 * out.detach().T @ x  # ∂L/∂ΔW for L = Σ out²
    score = (dw * G).abs().sum() / math.sqrt(dw.numel())
    torch.testing.assert_close(d.score, score)
    opt = torch.optim.SGD(ss.adapter_parameters(m), lr=0.0)
    ss.adapters.step(m, optimizer=opt)
    avg = 0.15 * score
    torch.testing.assert_close(d.importance(), avg * 0.15 * (score - avg).abs())


def test_penalty_runs_over_every_piece():
    _, m = inc_bert(orth_reg_weight=0.1, rank=2)
    res = []
    for d in deltas(m):
        res += [torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0])) for a in d.A]
        res += [torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1])) for b in d.B]
    torch.testing.assert_close(ss.adapters.penalty(m).detach(), 0.1 * torch.stack(res).mean().detach())


def test_growth_without_an_optimizer_is_a_clear_error():
    _, m = inc_bert()
    m(input_ids=ids()).logits.sum().backward()
    ss.adapters.step(m)  # t = 0: nothing grows yet
    with pytest.raises(ss.SubspacesError, match="optimizer"):
        ss.adapters.step(m)


def test_without_advance_learning_reserves_are_frozen_until_chosen():
    _, m = inc_bert(advance_learn=False)
    layer = adapted_layers(m)[0][1]
    assert sum(p.numel() for p in ss.adapter_parameters(m)) == 4 * (32 + 32 + 1)
    assert IncreLoRA().num_trainable(layer) == 32 + 32 + 1 + 32 + 32
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=1e-2)
    train_step(m, opt, 0)
    train_step(m, opt, 1)
    for d in deltas(m):
        assert all(p.requires_grad == (d.rank == 2) for p in (d.A[1], d.E[1], d.B[1]))


@pytest.mark.parametrize("steps", [3, 6])  # mid-growth and after the budget is reached
def test_save_load_after_growth_reproduces_outputs(tmp_path, steps):
    base, m = inc_bert()
    opt = torch.optim.AdamW(ss.adapter_parameters(m), lr=1e-2)
    for i in range(steps):
        train_step(m, opt, i)
    x = ids()
    ss.save_adapter(m, tmp_path / "a")
    loaded = ss.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(logits(loaded, x), logits(m, x), atol=0, rtol=0)
    for a, b in zip(deltas(loaded), deltas(m)):
        assert (a.rank, a.t, len(a.A)) == (b.rank, b.t, len(b.A))
        assert [p.requires_grad for p in a.parameters()] == [p.requires_grad for p in b.parameters()]
    opt2 = torch.optim.AdamW(ss.adapter_parameters(loaded), lr=1e-2)
    for i in range(steps, 7):
        train_step(loaded, opt2, i)  # the schedule continues from the saved step
    assert sum(d.rank for d in deltas(loaded)) == 8
    report = ss.export_lora(loaded, tmp_path / "lora")
    assert [r["rank"] for r in report] == [d.rank for d in deltas(loaded)]


def test_runs_in_an_unmodified_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from subspaces.integrations.hf_trainer import AdapterSchedule

    _, m = inc_bert()
    data = [{"input_ids": ids(1, 6, seed=i)[0], "labels": torch.tensor(i % 3)} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, num_train_epochs=2,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", lr_scheduler_type="linear")
    trainer = Trainer(model=m, args=args, train_dataset=data, callbacks=[AdapterSchedule()])
    trainer.train()
    assert sum(d.rank for d in deltas(m)) == 8
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in ss.adapter_parameters(m)} <= in_opt
    grown = [e for d in deltas(m) for e in d.E[1:d.rank]]  # the switched-on e (rank - 1 per module)
    assert len(grown) == 4
    assert all(len(trainer.optimizer.state[e]) > 0 for e in grown)  # they were stepped
    assert len(trainer.optimizer.param_groups) == len(trainer.lr_scheduler.base_lrs)  # no group escapes the schedule
