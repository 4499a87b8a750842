"""Conformance: every registered train method (``ss.optim.setup_``) passes the same contract tests.

Enrolled automatically from the TRAIN registry; ``OVERRIDES`` fits each method to the tiny LLaMA (hidden 32).
Contract: the optimizer trains (loss falls), its state is plain tensors (``torch.load(weights_only=True)``), a run
interrupted and resumed from a checkpoint equals the uninterrupted run bit for bit, the measured state bytes equal
the analytic formula, and it runs in an unmodified Hugging Face ``Trainer`` with an LR scheduler.
"""
from __future__ import annotations

import io

import pytest
import torch

import subspaces as ss
import subspaces.optim  # noqa: F401  (importing registers the methods)
from subspaces._registry import TRAIN

OVERRIDES: dict[str, dict] = {
    "galore": {"rank": 4, "update_every": 2},
    "dct": {"rank": 4, "update_every": 2},
    "random": {"rank": 4, "update_every": 2},
    "sculpt": {"retention": 0.5},
    "sltrain": {"rank": 4, "density": 0.1},
    "sst": {"rank": 4, "steps_per_iteration": 2},
    "restarts": {"rank": 4, "update_every": 2, "reset_every": 2},
    "welore": {"reduction": 0.3},
}
LR = {"sculpt": 1e-3, "welore": 1e-3}
METHODS = [e.name for e in TRAIN.entries()]


def model():
    return ss.models.tiny_llama(hidden_size=32, intermediate_size=64, num_attention_heads=4, seed=0)


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (2, 12), generator=g) for _ in range(n)]


def build(name: str):
    m = model()
    opt = ss.optim.setup_(m, name, lr=LR.get(name, 1e-2), **OVERRIDES.get(name, {}))
    return m, opt


def train(m, opt, data) -> list[float]:
    losses = []
    for x in data:
        opt.zero_grad()
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", METHODS)
def test_trains(name):
    m, opt = build(name)
    x = batches(1)[0]
    losses = train(m, opt, [x] * 8)
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("name", METHODS)
def test_resume_is_bit_exact(name):
    data = batches(6)
    m, opt = build(name)
    train(m, opt, data)
    a, opt_a = build(name)
    train(a, opt_a, data[:3])
    saved_model, saved_opt = roundtrip(a.state_dict()), roundtrip(opt_a.state_dict())
    b, opt_b = build(name)
    b.load_state_dict(saved_model)
    opt_b.load_state_dict(saved_opt)
    train(b, opt_b, data[3:])
    for (k, p), q in zip(m.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("name", METHODS)
def test_state_bytes_match_the_formula(name):
    m, opt = build(name)
    train(m, opt, batches(3))  # odd: SST (T3 = 2) drops the moments of resampled columns after even steps
    assert ss.optim.state_bytes(opt) == ss.optim.expected_state_bytes(opt) > 0


@pytest.mark.parametrize("name", METHODS)
def test_runs_in_an_unmodified_trainer(name, tmp_path):
    from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

    m, opt = build(name)
    sched = get_cosine_schedule_with_warmup(opt, 1, 4)
    data = [{"input_ids": x[0], "labels": x[0]} for x in batches(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4,
                             max_grad_norm=1.0, gradient_accumulation_steps=2, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, logging_strategy="no")
    before = [p.detach().clone() for p in m.parameters()]
    Trainer(model=m, args=args, train_dataset=data, optimizers=(opt, sched)).train()
    assert sched.last_epoch == 4
    assert any(not torch.equal(p, q) for p, q in zip(before, m.parameters()))


def test_unknown_method_and_hyperparameter():
    with pytest.raises(ss.SubspacesError, match="Did you mean 'galore'"):
        ss.optim.setup_(model(), "galor", lr=1e-3)
    with pytest.raises(ss.SubspacesError, match="unknown hyperparameter"):
        ss.optim.setup_(model(), "galore", lr=1e-3, rnk=4)
