"""The causal-LM recipe (TRL's SFTTrainer underneath): completion-only loss, every method kind, chat data, generative
accuracy, and parity with PEFT + TRL on the same LoRA run. A tiny random LLaMA with a tokenizer of its own."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_lm_folder

import subspaces as ss
from subspaces import SubspacesError
from subspaces.data import SFTTask
from subspaces.harness.sft import finetune_lm

QUICK = dict(max_steps=4, batch_size=4, max_train=32, max_test=8, max_new_tokens=8, progress=False)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    return str(tiny_lm_folder(tmp_path_factory.mktemp("tiny-lm")))


@pytest.fixture(scope="module")
def task():
    return ss.data.load_task("arithmetic")


def test_held_out_loss_is_the_completion_tokens_only(lm, task):
    """The zero-shot row's eval loss equals cross-entropy on completion (+ eos) tokens, the prompt masked."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    metrics, *_ = finetune_lm(model=lm, task=task, method="zero-shot", **{**QUICK, "batch_size": 8})
    tok, model = AutoTokenizer.from_pretrained(lm), AutoModelForCausalLM.from_pretrained(lm).eval()
    total, count = 0.0, 0
    for row in task.test[:8]:
        p = tok(row["prompt"])["input_ids"]
        ids = tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"]
        assert ids[:len(p)] == p
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")[len(p) - 1:]
        total, count = total + ce.sum().item(), count + len(ce)
    assert metrics["eval_loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["trainable_params"] == 0 and metrics["steps"] == 0 and metrics["artifact_bytes"] == 0
    assert metrics["test_accuracy"] == 0.0 and metrics["answer_scored"] == 8 and len(metrics["generations"]) == 8


@pytest.mark.parametrize("method, hp, kind", [
    ("lora", {"rank": 2}, "adapter"), ("full", {}, "baseline"), ("galore", {"rank": 4, "update_every": 2}, "train"),
    ("sltrain", {"rank": 4}, "train"),
])
def test_every_method_kind_trains(lm, task, method, hp, kind):
    metrics, model, tok = finetune_lm(model=lm, task=task, method=method, hyperparameters=hp, lr=1e-3, **QUICK)
    assert metrics["kind"] == kind and metrics["steps"] == 4 and len(metrics["loss_history"]) == 4
    assert math.isfinite(metrics["eval_loss"]) and metrics["test_accuracy"] is not None
    assert metrics["artifact_bytes"] > 0 and metrics["memory"]["max_mb"] >= 0
    assert metrics["optimizer_state_bytes"] > 0 and metrics["versions"]["trl"]
    total = sum(p.numel() for p in model.parameters())
    assert (metrics["trainable_params"] < total) == (kind == "adapter")
    assert metrics["reparameterized"] == (method == "sltrain")
    if method == "galore":  # projected moments: less state than AdamW's two per parameter
        assert metrics["optimizer_state_bytes"] < 2 * 4 * total


def test_chat_rows_train_and_generate(lm, tmp_path):
    import json

    chats = [{"messages": [{"role": "user", "content": f"add {i} and 1"},
                           {"role": "assistant", "content": f"#### {i + 1}"}]} for i in range(12)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in chats))
    task = ss.data.load_task("causal-lm", data=path)
    metrics, *_ = finetune_lm(model=lm, task=task, method="lora", **QUICK)
    g = metrics["generations"][0]
    assert g["prompt"].startswith("add ") and g["reference"].startswith("#### ")
    assert metrics["answer_scored"] == len(task.test)


def test_bad_input(lm, task):
    with pytest.raises(SubspacesError, match="not a baseline of a causal-lm task"):
        finetune_lm(model=lm, task=task, method="probe", **QUICK)
    with pytest.raises(SubspacesError, match="classification task"):
        finetune_lm(model=lm, task="docstring", method="lora", **QUICK)
    with pytest.raises(SubspacesError, match="max_new_tokens=0"):
        finetune_lm(model=lm, task=task, method="lora", **{**QUICK, "max_new_tokens": 0})
    with pytest.raises(SubspacesError, match="unknown method 'galorre'"):
        finetune_lm(model=lm, task=task, method="galorre", **QUICK)


def test_lora_equals_peft_plus_trl(lm, task, tmp_path):
    """The same LoRA (init copied through a PEFT folder, B = 0), data order and seed: our run and a plain PEFT +
    TRL run give the same training loss at each of 20 steps."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    import datasets

    base = AutoModelForCausalLM.from_pretrained(lm)
    torch.manual_seed(0)
    ss.adapt_(base, "lora", targets=["q_proj", "v_proj"], rank=4, alpha=8)
    init = ss.save_adapter(base, tmp_path / "init", format="peft")
    steps = dict(max_steps=20, batch_size=4, lr=1e-3, seed=0, max_train=80, max_test=4, max_new_tokens=2)
    ours, *_ = finetune_lm(model=lm, task=task, method="lora", adapter=init, progress=False, **steps)

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lm), init, is_trainable=True)
    args = SFTConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, max_steps=20,
                     learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=0.06, weight_decay=0.0, seed=0,
                     data_seed=0, logging_steps=1, report_to="none", use_cpu=True, bf16=False, save_strategy="no",
                     activation_checkpointing=False, max_length=256, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(lm),
                         train_dataset=datasets.Dataset.from_list(task.train[:80]))
    trainer.train()
    theirs = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    mine = [h["loss"] for h in ours["loss_history"]]
    assert len(mine) == len(theirs) == 20
    assert max(abs(a - b) for a, b in zip(mine, theirs)) <= 1e-4
    assert mine[-1] < mine[0]  # it trained


def test_packing_puts_several_examples_in_a_sequence(lm, task):
    kw = {**QUICK, "max_steps": None, "epochs": 1, "max_train": 32}
    plain, *_ = finetune_lm(model=lm, task=task, method="lora", **kw)
    packed, *_ = finetune_lm(model=lm, task=task, method="lora", packing=True, **kw)
    assert plain["steps"] == 8 and packed["steps"] <= plain["steps"] // 2 and math.isfinite(packed["eval_loss"])
