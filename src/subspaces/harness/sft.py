"""One fine-tuning run of a causal LM on prompt / completion rows, trained by TRL's ``SFTTrainer``.

TRL does the data work (prompt + completion tokenized together, the loss on the completion tokens only, chat
templates for message rows, optional packing), so nothing here tokenizes for training. ``method`` is ``"zero-shot"``
(the base model, evaluated only), ``"full"``, an adapter (``ss.adapt_``) or a train-family method (``ss.optim.setup_``
gives the Trainer its optimizer). Evaluation: the loss and perplexity of the held-out completions (the Trainer's
own), and generative accuracy: greedy decoding, the answer extracted by the task's pattern, exact match.
"""
from __future__ import annotations

import math
import tempfile
import time
from typing import Any

import torch

from .._errors import SubspacesError
from ._memory import PeakMemory
from ._methods import check_method, check_setup, default_targets, has_field, train_optimizer
from ._run import WARMUP, artifact_bytes, history, trainer_kwargs, versions

# Measured on SmolLM2-135M / arithmetic (docs/results.md); train methods at full fine-tuning's rate over GaLore's
# default scale 0.25, so that their projected updates are as large as full fine-tuning's.
DEFAULT_LR = {"full": 5e-5, "adapter": 1e-3, "train": 2e-4}


def configure_lm(model: torch.nn.Module, method: str, hyperparameters: dict[str, Any], adapter: Any = None, *,
                 lr: float) -> torch.optim.Optimizer | None:
    """Make exactly ``method``'s parameters trainable (in place); a train-family method's optimizer, else None."""
    import subspaces as ss

    kind = check_setup(method, "causal-lm", hyperparameters, adapter)
    if kind == "train":
        return train_optimizer(model, method, dict(hyperparameters), lr=lr)
    model.requires_grad_(method == "full")
    if adapter is not None:
        ss.load_adapter(model, adapter)
    elif kind == "adapter":
        hp = dict(hyperparameters)
        ss.adapt_(model, method, targets=hp.pop("targets", None) or default_targets(model), **hp)
    return None


def finetune_lm(
    *,
    model: str = "smollm2",
    task: Any = "arithmetic",
    method: str = "lora",
    hyperparameters: dict[str, Any] | None = None,
    epochs: float = 1,
    max_steps: int | None = None,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int = 8,
    max_length: int = 256,
    max_train: int | None = None,
    max_test: int | None = None,
    bf16: bool = False,
    packing: bool = False,
    max_new_tokens: int = 64,
    adapter: Any = None,
    samples: int = 20,
    progress: bool = True,
) -> tuple[dict[str, Any], torch.nn.Module, Any]:
    """Train and evaluate; returns (metrics, trained model, tokenizer). ``metrics["generations"]`` holds the first
    ``samples`` test prompts with their reference and the model's output; ``metrics["reparameterized"]`` says
    whether the method changed the model's modules (SLTrain, SST, WeLore: not loadable by ``from_pretrained``)."""
    from ..data import load_task
    from ..models import load_causal_lm

    kind = check_method(method, "causal-lm")
    hyperparameters = dict(hyperparameters or {})
    hp = dict(hyperparameters)
    lr = hp.pop("lr", lr)
    lr = lr if lr is not None else DEFAULT_LR.get(method) or DEFAULT_LR.get(kind, 0.0)
    data = load_task(task, seed=seed) if isinstance(task, str) else task
    if data.kind != "causal-lm":
        raise SubspacesError(f"task {data.name!r} is a {data.kind} task; this recipe trains a causal LM")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SubspacesError(f"{name}={value!r}: must be a positive integer")
    lm, tokenizer = load_causal_lm(model, torch.float32, torch.device("cpu"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # after the input is checked: TRL imports the Trainer, which imports peft (and bitsandbytes) where installed
    import dataclasses

    import datasets
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()  # TRL's dataset preparation bars; ours shows the training
    no_ckpt = {"activation_checkpointing" if "activation_checkpointing" in {f.name for f in dataclasses.fields(
        SFTConfig)} else "gradient_checkpointing": False}  # TRL turns it on by default; transformers renamed it

    from ..integrations.hf_trainer import AdapterSchedule, RichProgress

    set_seed(seed)
    train_rows, test_rows = data.train[:max_train], data.test[:max_test]
    total_steps = max_steps or math.ceil(math.ceil(len(train_rows) / batch_size) * epochs)
    if has_field(method, "total_steps") and "total_steps" not in hp:
        hp["total_steps"] = total_steps
    keys = set(lm.state_dict())
    opt = configure_lm(lm, method, hp, adapter, lr=lr)
    with tempfile.TemporaryDirectory(prefix="subspaces-trainer-") as scratch:
        args = SFTConfig(**trainer_kwargs(scratch=scratch, batch_size=batch_size, epochs=epochs, max_steps=max_steps,
                                          lr=lr, seed=seed, bf16=bf16),
                         max_length=max_length, packing=packing, **no_ckpt)
        if opt is None and method != "zero-shot":
            opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        label = f"{method} on {data.name}"
        trainer = SFTTrainer(model=lm, args=args, processing_class=tokenizer,
                             train_dataset=datasets.Dataset.from_list(train_rows),
                             eval_dataset=datasets.Dataset.from_list(test_rows),
                             optimizers=(opt, None) if opt is not None else (None, None),
                             callbacks=[AdapterSchedule()] + ([RichProgress(label)] if progress else []))
        trainer.remove_callback(PrinterCallback)
        device = args.device
        start = time.perf_counter()
        with PeakMemory(device) as mem:
            if method != "zero-shot":
                trainer.train()
        wall = time.perf_counter() - start
        eval_loss = trainer.evaluate()["eval_loss"]
    lm.eval()
    scores, generations = generative_accuracy(lm, tokenizer, test_rows, data.answer_pattern, max_new_tokens,
                                              device=device, batch_size=max(batch_size, 16))
    import subspaces as ss

    metrics = {
        "method": method, "kind": kind, "model": model, "task": data.name, "task_kind": "causal-lm", "seed": seed,
        "epochs": epochs, "max_steps": max_steps, "lr": lr, "batch_size": batch_size, "max_length": max_length,
        "packing": packing, "warmup": WARMUP, "max_new_tokens": max_new_tokens, "hyperparameters": hyperparameters,
        **scores, "eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        "trainable_params": sum(p.numel() for p in lm.parameters() if p.requires_grad),
        "optimizer_state_bytes": ss.optim.state_bytes(opt) if opt is not None else 0,
        "wall_time_s": wall, "peak_memory_mb": mem.peak_bytes / 2**20, "memory": mem.stats(),
        "artifact_bytes": 0 if method == "zero-shot" else artifact_bytes(lm, "adapter" if kind == "adapter" else
                                                                          "model"),
        "device": str(device), "world_size": args.world_size, "steps": trainer.state.global_step,
        "train_examples": len(train_rows), "test_examples": len(test_rows), "versions": versions(),
        "reparameterized": kind == "train" and set(lm.state_dict()) != keys,
        "loss_history": history(trainer), "generations": generations[:samples],
    }
    return metrics, lm, tokenizer


def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
    """The prompt tokenized as TRL tokenizes it for training (chat rows: the template with the generation prompt)."""
    if isinstance(prompt, str):
        return tokenizer(text=prompt)["input_ids"]
    return tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)[
        "input_ids"]


def _text(value: Any) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


@torch.no_grad()
def generative_accuracy(model: torch.nn.Module, tokenizer: Any, rows: list[dict], pattern: str | None,
                        max_new_tokens: int, *, device: Any, batch_size: int = 16
                        ) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Greedy decoding of every test prompt (left-padded batches); the answer extracted from output and reference
    by ``pattern``, compared exactly. Rows whose reference has no answer are not scored (``answer_scored``).
    ``test_accuracy_flexible`` takes the output's last number instead (lm-eval's flexible extract of GSM8K): it
    credits a model that computes the answer without the answer format, as a zero-shot model does."""
    from ..data import extract_answer, last_number

    model.to(device)
    pad = tokenizer.pad_token_id
    correct = flexible = scored = 0
    generations = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        ids = [_prompt_ids(tokenizer, r["prompt"]) for r in chunk]
        width = max(map(len, ids))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad)
        for row, new in zip(chunk, out[:, width:]):
            text = tokenizer.decode(new, skip_special_tokens=True)
            ref = _text(row["completion"])
            want, got = extract_answer(ref, pattern), extract_answer(text, pattern)
            if want is not None:
                scored += 1
                correct += got == want
                flexible += last_number(text) == want
            generations.append({"prompt": _text(row["prompt"]), "reference": ref, "output": text,
                                "correct": want is not None and got == want})
    return {"test_accuracy": correct / scored if scored else None,
            "test_accuracy_flexible": flexible / scored if scored else None, "answer_scored": scored}, generations
