"""SoRA faithful tests (../shared/methods/adapter-sora.md) and the schedule hooks it exercises."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import bert_seqcls, ids, logits

import subspaces as ss
from subspaces.adapters._core import DELTA, adapted_layers
from subspaces.adapters.sora import SoRA, soft_threshold

QV = ["query", "value"]


def sora_bert(**kw):
    base = bert_seqcls()
    m = copy.deepcopy(base)
    ss.adapt_(m, "sora", targets=QV, **{"rank": 4, **kw})
    return base, m


def deltas(m):
    return [layer._modules[DELTA] for _, layer in adapted_layers(m)]


def test_soft_threshold_by_hand():
    z = torch.tensor([0.5, -0.5, 0.1, -0.1, 0.0, 0.3])
    torch.testing.assert_close(soft_threshold(z, 0.2), torch.tensor([0.3, -0.3, 0.0, 0.0, 0.0, 0.1]))
    assert (soft_threshold(z, 0.2)[2:5] == 0).all()  # exactly zero below the threshold


def test_identity_at_init_despite_random_gates():
    base, m = sora_bert()
    assert all(d.g.abs().sum() > 0 for d in deltas(m))
    torch.testing.assert_close(logits(m, ids()), logits(base, ids()), atol=0, rtol=0)


def test_gates_get_no_weight_decay():
    _, m = sora_bert()
    groups = ss.adapters.param_groups(m, weight_decay=0.1)
    gates = {id(d.g) for d in deltas(m)}
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert gates <= plain and not gates & decayed
    assert {id(d.A) for d in deltas(m)} <= decayed
    assert sum(len(g["params"]) for g in groups) == len([p for p in m.parameters() if p.requires_grad])


def test_step_is_the_proximal_update_after_adamw():
    _, m = sora_bert(xi=0.05)
    opt = torch.optim.AdamW(ss.adapters.param_groups(m, weight_decay=0.0), lr=0.1)
    m(input_ids=ids()).logits.pow(2).mean().backward()
    opt.step()
    z = [d.g.detach().clone() for d in deltas(m)]  # the post-AdamW values
    ss.adapters.step(m)
    for d, zz in zip(deltas(m), z):
        torch.testing.assert_close(d.g.detach(), soft_threshold(zz, 0.05))


def test_lr_scaled_threshold_uses_the_learning_rate():
    _, m = sora_bert(xi=1.0, threshold="lr_scaled")
    before = [d.g.detach().clone() for d in deltas(m)]
    ss.adapters.step(m, lr=0.25)
    for d, b in zip(deltas(m), before):
        torch.testing.assert_close(d.g.detach(), soft_threshold(b, 0.25))
    with pytest.raises(ss.SubspacesError, match="learning rate"):
        ss.adapters.step(m)


def test_l1_penalty_is_mean_abs_gate_over_all_gates():
    _, m = sora_bert(l1=10.0)
    gates = torch.cat([d.g.detach() for d in deltas(m)])
    torch.testing.assert_close(ss.adapters.penalty(m).detach(), 10.0 * gates.abs().mean())
    _, plain = sora_bert()
    assert ss.adapters.penalty(plain) == 0.0


def test_pruned_components_export_as_smaller_rank_with_same_outputs(tmp_path):
    base, m = sora_bert()
    with torch.no_grad():
        for d in deltas(m):
            d.B.normal_(std=0.1)
            d.g[:2] = 0.0  # two of four components switched off
    x = ids()
    adapted = logits(m, x)
    report = ss.export_lora(m, tmp_path / "lora")
    assert all(r["rank"] == 2 for r in report)
    exported = ss.load_adapter(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(logits(exported, x), adapted, atol=1e-5, rtol=0)
    layer = adapted_layers(exported)[0][1]
    assert sum(p.numel() for p in layer._modules[DELTA].parameters()) == 2 * (32 + 32)  # nnz(g)(d_in + d_out)


def test_fold_is_b_diag_g_a():
    _, m = sora_bert()
    layer = adapted_layers(m)[0][1]
    d = layer._modules[DELTA]
    with torch.no_grad():
        d.B.normal_()
    expected = d.config.alpha / d.config.rank * d.B @ torch.diag(d.g) @ d.A
    torch.testing.assert_close(d.weight(), expected)
    x = torch.randn(3, 32)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight + expected, layer.bias))


def test_runs_in_an_unmodified_trainer_and_zeroes_gates(tmp_path):
    from transformers import Trainer, TrainingArguments

    from subspaces.integrations.hf_trainer import AdapterSchedule

    _, m = sora_bert(xi=0.3, l1=1.0)
    data = [{"input_ids": ids(1, 6, seed=i)[0], "labels": torch.tensor(i % 3)} for i in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=2,
                             learning_rate=1e-2, report_to="none", save_strategy="no", use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    opt = torch.optim.AdamW(ss.adapters.param_groups(m, weight_decay=0.01), lr=1e-2)
    Trainer(model=m, args=args, train_dataset=data, optimizers=(opt, None), callbacks=[AdapterSchedule()]).train()
    gates = torch.cat([d.g.detach() for d in deltas(m)])
    assert (gates == 0).sum() >= gates.numel() // 2  # N(0,1) gates under a 0.3 threshold: most switch off
    assert SoRA(rank=4).num_trainable(torch.nn.Linear(32, 32)) == 4 * (32 + 32 + 1)


def test_sparsifying_scheduler_raises_xi_and_records_the_trade_off(tmp_path):
    """Paper Alg. 1: ξ through linspace(ξ_0, ξ_max, n)[1:], training continuing from the current weights; the
    remaining components shrink as ξ grows, and the final ξ is saved with the adapter."""
    from subspaces.adapters.sora import set_xi_, sparsify, sparsity, xi_schedule

    assert xi_schedule(0.0, 7e-4, 8) == pytest.approx([i * 1e-4 for i in range(8)])
    with pytest.raises(ss.SubspacesError):
        xi_schedule(1e-3, 1e-4, 3)
    with pytest.raises(ss.SubspacesError, match="no SoRA"):
        set_xi_(bert_seqcls(), 0.1)
    _, m = sora_bert(xi=0.0)
    x = ids(seed=5)
    opt = torch.optim.AdamW(ss.adapters.param_groups(m, weight_decay=0.0), lr=1e-2)

    def train(model):
        for _ in range(3):
            model(input_ids=x).logits.pow(2).mean().backward()
            opt.step()
            ss.adapters.step(model, lr=1e-2, optimizer=opt)
            opt.zero_grad()

    start = sparsity(m)
    assert start["ranks"] == start["max_ranks"]
    history = sparsify(m, xi_schedule(0.0, 1.5, 4)[1:], train=train, evaluate=lambda model: 0.5)
    assert [h["xi"] for h in history] == pytest.approx([0.5, 1.0, 1.5])
    ranks = [h["ranks"] for h in history]
    assert ranks == sorted(ranks, reverse=True) and ranks[-1] < start["ranks"]
    assert all(h["metric"] == 0.5 for h in history)
    d = deltas(m)[0]
    assert history[-1]["params"] == sum(int((dd.g != 0).sum()) * (dd.A.shape[1] + dd.B.shape[0]) for dd in deltas(m))
    assert d.config.xi == 1.5
    ss.save_adapter(m, tmp_path / "a")
    assert deltas(ss.load_adapter(bert_seqcls(), tmp_path / "a"))[0].config.xi == 1.5
