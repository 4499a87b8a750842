"""One fine-tuning run on a text-classification task, trained by the Hugging Face ``Trainer``.

``method`` is ``"probe"`` (frozen encoder, train the head), ``"full"`` (every parameter) or an adapter registry
key (``"lora"``, ...) whose hyperparameters come in ``hyperparameters`` (``targets``/``exclude`` included).
Runs under ``torchrun`` as is: the global batch is split across processes (accelerate's ``split_batches``),
so N processes reproduce one process with the same batch.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .._errors import SubspacesError
from ._memory import PeakMemory

BASELINES = ("probe", "full")
DEFAULT_LR = {"probe": 5e-3, "full": 1e-4, "adapter": 1e-3}


def load_encoder(model: str):
    """(AutoModel, tokenizer) for ``"minilm"`` (the embedded default) or a Hugging Face folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..models import minilm_path

    path = minilm_path() if model == "minilm" else Path(model)
    if not (path / "config.json").is_file():
        raise SubspacesError(f"model {model!r}: not 'minilm' nor a Hugging Face folder with config.json")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise SubspacesError(f"model {model!r}: cannot load ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def default_targets(model: torch.nn.Module) -> list[str] | str:
    """The LoRA paper's choice, W_q and W_v, under the names this architecture uses; else all linear layers."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["q", "v"]):
        if set(pair) <= names:
            return pair
    return "all-linear"


def configure(clf: torch.nn.Module, method: str, hyperparameters: dict[str, Any]) -> None:
    """Make exactly the parameters of ``method`` trainable (in place)."""
    import subspaces as ss

    if method == "full":
        clf.requires_grad_(True)
    elif method == "probe":
        clf.encoder.requires_grad_(False)
    else:
        hp = dict(hyperparameters)
        targets = hp.pop("targets", None) or default_targets(clf.encoder)
        ss.adapt_(clf.encoder, method, targets=targets, **hp)
        clf.classifier.requires_grad_(True)
    if method in BASELINES and hyperparameters:
        raise SubspacesError(f"method {method!r} takes no hyperparameters (got {sorted(hyperparameters)})")


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
    progress: bool = True,
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Train and evaluate; returns (metrics, trained classifier). Metrics: accuracy, trainable parameters,
    wall time (s), peak memory (MB), loss history."""
    from transformers import Trainer, TrainingArguments, set_seed

    from ..data import load_task
    from ..integrations.hf_trainer import RichProgress
    from ._classifier import Collator, MeanPoolClassifier, encode

    hyperparameters = dict(hyperparameters or {})
    data = load_task(task, seed=seed)
    encoder, tokenizer = load_encoder(model)
    set_seed(seed)
    clf = MeanPoolClassifier(encoder, data.num_labels)
    configure(clf, method, hyperparameters)
    train = encode(tokenizer, data.train_texts[:max_train], data.train_labels[:max_train], max_length)
    test = encode(tokenizer, data.test_texts[:max_test], data.test_labels[:max_test], max_length)
    lr = lr if lr is not None else DEFAULT_LR.get(method, DEFAULT_LR["adapter"])
    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    with tempfile.TemporaryDirectory(prefix="subspaces-trainer-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
            num_train_epochs=epochs, learning_rate=lr, weight_decay=0.0, lr_scheduler_type="linear",
            warmup_steps=0.06, logging_steps=5, save_strategy="no", report_to="none", seed=seed, data_seed=seed,
            disable_tqdm=True, use_cpu=not cuda, bf16=bf16, ddp_backend="gloo" if distributed and not cuda else None,
            accelerator_config={"split_batches": True}, remove_unused_columns=False, train_sampling_strategy="group_by_length",
            dataloader_drop_last=False, log_level="error",
        )
        trainer = Trainer(model=clf, args=args, train_dataset=train, data_collator=Collator(tokenizer.pad_token_id),
                          callbacks=[RichProgress(f"{method} on {task}")] if progress else [])
        device = args.device
        start = time.perf_counter()
        with PeakMemory(device) as mem:
            trainer.train()
        wall = time.perf_counter() - start
        pred = trainer.predict(test)
    logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
    accuracy = float((logits.argmax(-1) == pred.label_ids).mean())
    metrics = {
        "method": method, "model": model, "task": task, "seed": seed, "epochs": epochs, "lr": lr,
        "batch_size": batch_size, "hyperparameters": hyperparameters,
        "test_accuracy": accuracy,
        "trainable_params": sum(p.numel() for p in clf.parameters() if p.requires_grad),
        "wall_time_s": wall, "peak_memory_mb": mem.peak_bytes / 2**20, "device": str(device),
        "world_size": args.world_size, "train_examples": len(train), "test_examples": len(test),
        "loss_history": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
    }
    return metrics, clf
