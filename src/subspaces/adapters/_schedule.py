"""Training-schedule hooks for adapters with a schedule (SoRA, AdaLoRA, IncreLoRA, Maestro, ...).

In a custom loop::

    loss = task_loss + ss.adapters.penalty(model)     # 0 when no adapter has a penalty
    loss.backward()
    optimizer.step()
    ss.adapters.step(model, lr=current_lr, optimizer=optimizer)  # proximal updates, rank schedules
    optimizer.zero_grad()

With the Hugging Face Trainer, ``subspaces.integrations.hf_trainer.AdapterSchedule`` does the same from callbacks
(the penalty's gradient is added just before the optimizer step, after gradient clipping).
``param_groups`` splits the trainable parameters for an optimizer: parameters a method trains without weight
decay (SoRA's gates) go in their own group.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ._core import DELTA, adapted_layers


def _by_method(model: nn.Module) -> dict[type, list]:
    groups: dict[type, list] = defaultdict(list)
    for _, layer in adapted_layers(model):
        delta = layer._modules[DELTA]
        groups[type(delta.config)].append(delta)
    return groups


def penalty(model: nn.Module) -> torch.Tensor | float:
    """The sum of the adapters' loss penalties (0.0 when none has one); add it to the training loss."""
    terms = [t for cls, deltas in _by_method(model).items() if (t := cls.penalty(deltas)) is not None]
    return sum(terms) if terms else 0.0


def step(model: nn.Module, *, lr: float | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Call once per optimizer step, right after ``optimizer.step()`` and before ``zero_grad`` (importance
    scores read the gradients); ``lr`` is the current learning rate (lr-scaled proximal steps), ``optimizer``
    the one training the adapter (methods that grow new tensors add them to it)."""
    with torch.no_grad():
        for cls, deltas in _by_method(model).items():
            cls.after_step(deltas, lr=lr, optimizer=optimizer)


def param_groups(model: nn.Module, *, weight_decay: float) -> list[dict]:
    """Optimizer groups over every trainable parameter of ``model``: weight decay except where an adapter
    asks for none (``Delta.no_decay``); biases and 1-D parameters decay as given."""
    no_decay = set()
    for _, layer in adapted_layers(model):
        delta = layer._modules[DELTA]
        no_decay |= {id(getattr(delta, n)) for n in delta.no_decay}
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": weight_decay},
              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
