"""What every fine-tuning recipe shares: the Trainer's arguments (one schedule, one seed, DDP-ready), the record
of a run (package versions, device, artifact size, metrics over steps)."""
from __future__ import annotations

import os
import platform
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

WARMUP = 0.06  # fraction of the steps with a linear learning-rate warmup, then linear decay (transformers' own)


def trainer_kwargs(*, scratch: str, batch_size: int, epochs: float, max_steps: int | None, lr: float, seed: int,
                   bf16: bool) -> dict[str, Any]:
    """Arguments of ``TrainingArguments`` / TRL's ``SFTConfig`` common to every run. Under ``torchrun`` the global
    batch is split across processes (accelerate's ``split_batches``), so N processes reproduce one process."""
    cuda = torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return dict(
        output_dir=scratch, per_device_train_batch_size=batch_size, per_device_eval_batch_size=batch_size,
        num_train_epochs=epochs, max_steps=max_steps if max_steps is not None else -1, learning_rate=lr,
        weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=WARMUP, logging_steps=1, save_strategy="no",
        report_to="none", seed=seed, data_seed=seed, disable_tqdm=True, use_cpu=not cuda, bf16=bf16,
        log_level="error", ddp_backend="gloo" if distributed and not cuda else None,
        accelerator_config={"split_batches": True},
    )


def history(trainer: Any) -> list[dict[str, float]]:
    """Metrics over steps: the training loss, learning rate and gradient norm the Trainer logged at each step."""
    keep = ("step", "loss", "learning_rate", "grad_norm", "epoch")
    return [{k: h[k] for k in keep if k in h} for h in trainer.state.log_history if "loss" in h]


def versions() -> dict[str, str]:
    """Python, the packages a run depends on (those installed) and the device."""
    out = {"python": platform.python_version()}
    for name in ("subspaces", "torch", "transformers", "trl", "datasets", "accelerate", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    out["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.machine()}, " \
        f"{os.cpu_count()} cores)"
    return out


def artifact_bytes(model: torch.nn.Module, kind: str) -> int:
    """The size of what a user keeps from the run: the saved adapter's files (``kind="adapter"``), the trained
    tensors (``"trainable"``: a probe's head), or the model's tensors as ``save_pretrained`` writes them (shared
    tensors once)."""
    if kind == "trainable":
        return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if kind == "adapter":
        import subspaces as ss

        with tempfile.TemporaryDirectory(prefix="subspaces-size-") as tmp:
            ss.save_adapter(model, Path(tmp) / "a")
            return sum(f.stat().st_size for f in (Path(tmp) / "a").iterdir())
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
