"""Hugging Face Trainer glue: the adapters' schedule callback and a compact rich progress bar."""
from __future__ import annotations

import torch
from transformers import TrainerCallback


class RichProgress(TrainerCallback):
    """Replaces the Trainer's tqdm bar and its printed log dicts with one rich progress line."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.progress = None

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, loss="-")

    def on_step_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kw):
        if self.progress is not None and logs and "loss" in logs:
            self.progress.update(self.task, loss=f"{logs['loss']:.3f}")

    def on_train_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class AdapterSchedule(TrainerCallback):
    """Runs the adapters' training schedules inside an unmodified ``Trainer``: the gradient of
    ``ss.adapters.penalty`` just before each optimizer step, ``ss.adapters.step`` right after it."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        from ..adapters._schedule import penalty

        term = penalty(model)
        if isinstance(term, torch.Tensor) and term.requires_grad:
            term.backward()

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kw):
        from ..adapters._schedule import step

        step(model, lr=optimizer.param_groups[0]["lr"] if optimizer is not None else None, optimizer=optimizer)
