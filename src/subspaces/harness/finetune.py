"""One fine-tuning run on a text-classification task, trained by the Hugging Face ``Trainer``.

``method`` is ``"probe"`` (frozen encoder, train the head), ``"full"`` (every parameter) or an adapter registry
key (``"lora"``, ...) whose hyperparameters come in ``hyperparameters`` (``targets``/``exclude`` included);
``adapter`` continues training from a saved adapter (native or PEFT format) instead.
Runs under ``torchrun`` as is: the global batch is split across processes (accelerate's ``split_batches``),
so N processes reproduce one process with the same batch.
"""
from __future__ import annotations

import math
import os
import tempfile
import time
from typing import Any

import torch

from .._errors import SubspacesError
from ._memory import PeakMemory

BASELINES = ("probe", "full")
DEFAULT_LR = {"probe": 3e-2, "full": 1e-4, "adapter": 1e-3}
WARMUP = 0.06  # fraction of the steps with a linear learning-rate warmup
HEAD_LR = 5e-3  # the fresh classification head learns at the probe's rate whatever the method


def default_targets(model: torch.nn.Module) -> list[str] | str:
    """The LoRA paper's choice, W_q and W_v, under the names this architecture uses; else all linear layers."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["q", "v"]):
        if set(pair) <= names:
            return pair
    return "all-linear"


def configure(clf: torch.nn.Module, method: str, hyperparameters: dict[str, Any], adapter=None) -> None:
    """Make exactly the parameters of ``method`` trainable (in place); ``adapter`` starts from a saved one."""
    import subspaces as ss

    if method in BASELINES and (hyperparameters or adapter):
        raise SubspacesError(f"method {method!r} takes no hyperparameters nor adapter")
    if method == "full":
        clf.requires_grad_(True)
    elif method == "probe":
        clf.encoder.requires_grad_(False)
    elif adapter is not None:
        ss.load_adapter(clf, adapter)
        clf.classifier.requires_grad_(True)
    else:
        hp = dict(hyperparameters)
        targets = hp.pop("targets", None) or default_targets(clf.encoder)
        # train_head=false: the fresh head is adapted with the targets instead of trained on its own, as the
        # intrinsic-dimension papers put every parameter, the head's included, in the subspace.
        train_head = hp.pop("train_head", True)
        if not train_head:
            from .._targets import select

            targets = [n for n, _ in select(clf, targets)]
            targets += [] if "classifier" in targets else ["classifier"]
        ss.adapt_(clf, method, targets=targets, modules_to_save=["classifier"] if train_head else None, **hp)


def _has_field(method: str, name: str) -> bool:
    import dataclasses

    from .._registry import ADAPTERS

    return method in ADAPTERS and name in {f.name for f in dataclasses.fields(ADAPTERS.get(method).obj)}


def data_init(clf: torch.nn.Module, method: str, batches: list, n: int, *, lr: float, total_steps: float) -> None:
    """Run the method's data-driven initialization on the first ``n`` training batches, with the harness's
    warmup (``WARMUP`` of the steps), as the official LoRA-SB code uses it."""
    from .._registry import ADAPTERS

    hook = ADAPTERS.get(method).obj.data_init if method not in BASELINES else None
    if hook is None:
        raise SubspacesError(f"method {method!r} has no data-driven initialization (init_batches)")
    if not isinstance(n, int) or n <= 0:
        raise SubspacesError(f"init_batches={n!r}: must be a positive integer")
    hook(clf, batches[:n], lambda model, batch: model(**batch)["loss"], lr=lr,
         warmup_steps=max(1.0, math.ceil(WARMUP * total_steps)))


def finetune(
    *,
    model: str = "minilm",
    task: str = "docstring",
    method: str = "lora",
    hyperparameters: dict[str, Any] | None = None,
    epochs: float = 3,
    seed: int = 0,
    lr: float | None = None,
    batch_size: int = 32,
    max_length: int = 64,
    max_train: int | None = None,
    max_test: int | None = None,
    bf16: bool = False,
    adapter: str | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train and evaluate; returns (metrics, trained classifier). Metrics: accuracy, trainable parameters,
    wall time (s), peak memory (MB), loss history."""
    from ..data import load_task
    from ..models import load_encoder
    from ._classifier import Collator, MeanPoolClassifier, embed, encode

    hyperparameters = dict(hyperparameters or {})
    hp = dict(hyperparameters)
    init_batches = hp.pop("init_batches", 0)  # for a data-driven init (AdapterConfig.data_init)
    lr = hp.pop("lr", lr)  # a method's own learning rate ("intrinsic:dim=1000,lr=3e-2")
    lr = lr if lr is not None else DEFAULT_LR.get(method, DEFAULT_LR["adapter"])
    data = load_task(task, seed=seed)
    encoder, tokenizer = load_encoder(model)
    # after the input is checked: the Trainer imports peft, and peft bitsandbytes, where installed (seconds)
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    from ..integrations.hf_trainer import AdapterSchedule, RichProgress

    set_seed(seed)
    train = encode(tokenizer, data.train_texts[:max_train], data.train_labels[:max_train], max_length)
    test = encode(tokenizer, data.test_texts[:max_test], data.test_labels[:max_test], max_length)
    total_steps = math.ceil(len(train) / batch_size) * epochs
    if _has_field(method, "total_steps") and "total_steps" not in hp:
        hp["total_steps"] = math.ceil(total_steps)  # a rank schedule over the whole run (AdaLoRA)
    clf = MeanPoolClassifier(encoder, data.num_labels)
    configure(clf, method, hp, adapter)
    collate = Collator(tokenizer.pad_token_id)
    if init_batches:
        data_init(clf, method, [collate(train[i:i + batch_size]) for i in range(0, len(train), batch_size)],
                  init_batches, lr=lr, total_steps=total_steps)
    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    with tempfile.TemporaryDirectory(prefix="subspaces-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
            num_train_epochs=epochs, learning_rate=lr, weight_decay=0.0, lr_scheduler_type="linear",
            warmup_steps=WARMUP, logging_steps=5, save_strategy="no", report_to="none", seed=seed, data_seed=seed,
            disable_tqdm=True, use_cpu=not cuda, bf16=bf16, log_level="error", remove_unused_columns=False,
            ddp_backend="gloo" if distributed and not cuda else None,
            accelerator_config={"split_batches": True},  # N processes = one process with the same global batch
            train_sampling_strategy="random" if method == "probe" else "group_by_length",  # less padding
        )
        device = args.device
        head = [p for n, p in clf.classifier.named_parameters() if p.requires_grad and not n.startswith("delta.")]
        body = [p for p in clf.parameters() if p.requires_grad and all(p is not h for h in head)]
        groups = [g for g in ({"params": head, "lr": max(lr, HEAD_LR)}, {"params": body, "lr": lr}) if g["params"]]
        start = time.perf_counter()
        with PeakMemory(device) as mem:
            if method == "probe":  # the encoder is frozen: encode once, then train the head on the features
                train = embed(clf, train, collate, device, bf16)
            trainer = Trainer(model=clf, args=args, train_dataset=train, data_collator=collate,
                              optimizers=(torch.optim.AdamW(groups, lr=lr, weight_decay=0.0), None),
                              callbacks=[AdapterSchedule()] + ([RichProgress(f"{method} on {task}")] if progress else []))
            trainer.remove_callback(PrinterCallback)  # our progress line replaces its printed log dicts
            trainer.train()
        wall = time.perf_counter() - start
        pred = trainer.predict(embed(clf, test, collate, device, bf16) if method == "probe" else test)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    metrics = {
        "method": method, "model": model, "task": task, "seed": seed, "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "hyperparameters": hyperparameters,
        "test_accuracy": float((logits.argmax(-1) == pred.label_ids).mean()),
        "trainable_params": sum(p.numel() for p in clf.parameters() if p.requires_grad),
        "wall_time_s": wall, "peak_memory_mb": mem.peak_bytes / 2**20, "device": str(device),
        "world_size": args.world_size, "train_examples": len(train), "test_examples": len(test),
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
    }
    return metrics, clf
