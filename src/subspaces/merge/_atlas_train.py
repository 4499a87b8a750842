"""aTLAS-only training pieces (the shared ones are in ``_learned`` / ``_learned_inputs``): several target tasks,
cross-entropy or entropy objective, cosine learning-rate decay, validation scores, k-shot subsets.

Batches, heads and the forward pass are those of ``_learned_inputs``; several target tasks are ``{task: batches}``,
with ``logits={task: head}``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .._errors import SubspacesError
from ._learned import entropy_loss
from ._learned_inputs import forward, heads


def tasks(data: Any) -> dict[Any, Any]:
    """``{task: batches}``; a plain iterable of batches is the single task ``None``."""
    return dict(data) if isinstance(data, Mapping) else {None: data}


def objective(logits: torch.Tensor, labels: torch.Tensor | None, kind: str) -> torch.Tensor:
    """"cross_entropy" (needs labels) or "entropy" (labels ignored) of one batch, in float32."""
    if kind == "entropy":
        return entropy_loss(logits)
    if labels is None:
        raise SubspacesError("objective='cross_entropy' needs labelled batches ((inputs, labels) or a dict with "
                             "'labels'); use objective='entropy' for unlabelled data")
    return nn.functional.cross_entropy(logits.float(), labels)


def cosine(opt: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay of the learning rate from its value to 0 over ``total`` steps, no warm-up."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))


@torch.no_grad()
def evaluate(model: nn.Module, params: Mapping[str, torch.Tensor], data: Any, logits: Any,
             device: torch.device) -> tuple[float | None, float]:
    """(accuracy, or None when a batch lacks labels; mean entropy), averaged over tasks and batches."""
    hits = ent = 0.0
    n, labelled = 0, True
    for task, batches in tasks(data).items():
        head = heads(logits, [task])[0]
        for batch in batches:
            out, labels = forward(model, params, batch, head, device)
            ent += entropy_loss(out).item()
            labelled &= labels is not None
            if labels is not None:
                hits += (out.argmax(-1) == labels).float().mean().item()
            n += 1
    if n == 0:
        raise SubspacesError("val has no batches")
    return (hits / n if labelled else None), ent / n


def few_shot(inputs: Any, labels: torch.Tensor, k: int, *, batch_size: int = 32, seed: int = 0,
             min_batches: int = 1) -> list[tuple[Any, torch.Tensor]]:
    """k examples per class (all of a class with fewer), shuffled into ``(inputs, labels)`` batches.

    ``inputs`` is a Tensor, tuple or dict of tensors indexed on the first axis. ``min_batches`` repeats the subset
    until an epoch has that many batches (the official few-shot script oversamples to about 10 batches per epoch).
    """
    if not (isinstance(k, int) and k >= 1 and isinstance(batch_size, int) and batch_size >= 1):
        raise SubspacesError(f"few_shot: k={k!r}, batch_size={batch_size!r}; both must be integers >= 1")
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    keep = []
    for c in labels.unique(sorted=True):
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    keep = torch.cat(keep)
    reps = max(1, -(-min_batches * batch_size // len(keep)))  # ceil
    order = torch.cat([keep[torch.randperm(len(keep), generator=gen)] for _ in range(reps)])

    def take(x: Any, idx: torch.Tensor) -> Any:
        if isinstance(x, Mapping):
            return {key: take(v, idx) for key, v in x.items()}
        if isinstance(x, (tuple, list)):
            return type(x)(take(v, idx) for v in x)
        return x[idx.to(x.device)]

    return [(take(inputs, b), labels[b]) for b in order.split(batch_size)]
