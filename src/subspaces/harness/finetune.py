"""One fine-tuning run on a text-classification task, trained by the Hugging Face ``Trainer``.

``method`` is ``"probe"`` (frozen encoder, train the head), ``"full"`` (every parameter), an adapter registry key
(``"lora"``, ...) or a train-family method (``"galore"``, ``"dct"``, ... through ``ss.optim.setup_``), whose
hyperparameters come in ``hyperparameters`` (``targets``/``exclude`` included); ``adapter`` continues training from a
saved adapter (native or PEFT format) instead. ``task`` is an embedded task name or a :class:`TextTask` (a user's
file, ``ss.data.load_task("classification", data=...)``). Runs under ``torchrun`` as is (``_run.trainer_kwargs``).
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

DEFAULT_LR = {"probe": 3e-2, "full": 1e-4, "adapter": 1e-3, "train": 1e-4}
HEAD_LR = 5e-3  # the fresh classification head learns at the probe's rate (probe, full, adapters)


def configure(clf: torch.nn.Module, method: str, hyperparameters: dict[str, Any], adapter=None, *,
              lr: float = DEFAULT_LR["train"]) -> torch.optim.Optimizer | None:
    """Make exactly the parameters of ``method`` trainable (in place); ``adapter`` starts from a saved one. Returns
    the optimizer of a train-family method (None for the others: the recipe's AdamW)."""
    import subspaces as ss

    kind = check_setup(method, "classification", hyperparameters, adapter)
    if kind == "train":
        return train_optimizer(clf, method, dict(hyperparameters), lr=lr)
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
    return None


def data_init(clf: torch.nn.Module, method: str, batches: list, n: int, *, lr: float, total_steps: float) -> None:
    """Run the method's data-driven initialization on the first ``n`` training batches, with the harness's
    warmup (``WARMUP`` of the steps), as the official LoRA-SB code uses it."""
    from .._registry import ADAPTERS

    hook = ADAPTERS.get(method).obj.data_init if method in ADAPTERS else None
    if hook is None:
        raise SubspacesError(f"method {method!r} has no data-driven initialization (init_batches)")
    if not isinstance(n, int) or n <= 0:
        raise SubspacesError(f"init_batches={n!r}: must be a positive integer")
    hook(clf, batches[:n], lambda model, batch: model(**batch)["loss"], lr=lr,
         warmup_steps=max(1.0, math.ceil(WARMUP * total_steps)))


def finetune(
    *,
    model: str = "minilm",
    task: Any = "docstring",
    method: str = "lora",
    hyperparameters: dict[str, Any] | None = None,
    epochs: float = 3,
    max_steps: int | None = None,
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
    """Train and evaluate; returns (metrics, trained classifier). Metrics: accuracy and macro-F1, trainable
    parameters, optimizer-state bytes, wall time (s), memory (peak, mean, p99), artifact size, loss over steps."""
    from ..data import load_task
    from ..models import load_encoder
    from ._classifier import Collator, MeanPoolClassifier, embed, encode

    kind = check_method(method, "classification")
    hyperparameters = dict(hyperparameters or {})
    hp = dict(hyperparameters)
    init_batches = hp.pop("init_batches", 0)  # for a data-driven init (AdapterConfig.data_init)
    lr = hp.pop("lr", lr)  # a method's own learning rate ("intrinsic:dim=1000,lr=3e-2")
    lr = lr if lr is not None else DEFAULT_LR.get(method) or DEFAULT_LR[kind]
    data = load_task(task, seed=seed) if isinstance(task, str) else task
    if data.kind != "classification":
        raise SubspacesError(f"task {data.name!r} is a {data.kind} task; this recipe classifies (see finetune_lm)")
    encoder, tokenizer = load_encoder(model)
    # after the input is checked: the Trainer imports peft, and peft bitsandbytes, where installed (seconds)
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    from ..integrations.hf_trainer import AdapterSchedule, RichProgress

    set_seed(seed)
    train = encode(tokenizer, data.train_texts[:max_train], data.train_labels[:max_train], max_length)
    test = encode(tokenizer, data.test_texts[:max_test], data.test_labels[:max_test], max_length)
    total_steps = max_steps or math.ceil(len(train) / batch_size) * epochs
    if has_field(method, "total_steps") and "total_steps" not in hp:
        hp["total_steps"] = math.ceil(total_steps)  # a rank schedule over the whole run (AdaLoRA)
    clf = MeanPoolClassifier(encoder, data.num_labels)
    opt = configure(clf, method, hp, adapter, lr=lr)
    collate = Collator(tokenizer.pad_token_id)
    if init_batches:
        data_init(clf, method, [collate(train[i:i + batch_size]) for i in range(0, len(train), batch_size)],
                  init_batches, lr=lr, total_steps=total_steps)
    with tempfile.TemporaryDirectory(prefix="subspaces-trainer-") as scratch:
        args = TrainingArguments(
            **{**trainer_kwargs(scratch=scratch, batch_size=batch_size, epochs=epochs, max_steps=max_steps, lr=lr,
                                seed=seed, bf16=bf16), "per_device_eval_batch_size": 64},
            remove_unused_columns=False,
            train_sampling_strategy="random" if method == "probe" else "group_by_length",  # less padding
        )
        device = args.device
        if opt is None:
            head = [p for n, p in clf.classifier.named_parameters() if p.requires_grad and not n.startswith("delta.")]
            body = [p for p in clf.parameters() if p.requires_grad and all(p is not h for h in head)]
            groups = [g for g in ({"params": head, "lr": max(lr, HEAD_LR)}, {"params": body, "lr": lr})
                      if g["params"]]
            opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
        start = time.perf_counter()
        with PeakMemory(device) as mem:
            if method == "probe":  # the encoder is frozen: encode once, then train the head on the features
                train = embed(clf, train, collate, device, bf16)
            label = method if isinstance(task, str) else f"{method} on {data.name}"
            trainer = Trainer(model=clf, args=args, train_dataset=train, data_collator=collate,
                              optimizers=(opt, None),
                              callbacks=[AdapterSchedule()] + ([RichProgress(label)] if progress else []))
            trainer.remove_callback(PrinterCallback)  # our progress line replaces its printed log dicts
            trainer.train()
        wall = time.perf_counter() - start
        pred = trainer.predict(embed(clf, test, collate, device, bf16) if method == "probe" else test)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    import subspaces as ss

    metrics = {
        "method": method, "kind": kind, "model": model, "task": data.name, "task_kind": "classification",
        "seed": seed, "epochs": epochs, "max_steps": max_steps, "lr": lr, "batch_size": batch_size,
        "max_length": max_length, "warmup": WARMUP, "hyperparameters": hyperparameters,
        **classification_scores(logits.argmax(-1), pred.label_ids, data.num_labels),
        "trainable_params": sum(p.numel() for p in clf.parameters() if p.requires_grad),
        "optimizer_state_bytes": ss.optim.state_bytes(opt),
        "wall_time_s": wall, "peak_memory_mb": mem.peak_bytes / 2**20, "memory": mem.stats(),
        "artifact_bytes": artifact_bytes(clf, "adapter" if kind == "adapter" else
                                         "trainable" if method == "probe" else "model"),
        "device": str(device), "world_size": args.world_size, "steps": trainer.state.global_step,
        "train_examples": len(train), "test_examples": len(test), "versions": versions(),
        "loss_history": history(trainer),
    }
    return metrics, clf


def classification_scores(pred: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean over classes present in the labels or predictions of 2PR/(P+R))."""
    pred, labels = torch.as_tensor(pred), torch.as_tensor(labels)
    f1 = []
    for c in range(num_labels):
        tp = int(((pred == c) & (labels == c)).sum())
        n_pred, n_true = int((pred == c).sum()), int((labels == c).sum())
        if n_pred or n_true:
            f1.append(2 * tp / (n_pred + n_true))
    return {"test_accuracy": float((pred == labels).float().mean()), "test_macro_f1": sum(f1) / max(len(f1), 1)}
