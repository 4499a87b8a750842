"""AdaMerging: merging coefficients learned by entropy minimization on unlabelled test data (task-wise, layer-wise).

Yang, Wang, Shen, Liu, Guo, Wang, Tao, "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
https://arxiv.org/abs/2310.02575. Official code: https://github.com/EnnengYang/AdaMerging
(src/main_task_wise_adamerging.py, src/main_layer_wise_adamerging.py); FusionBench's fusion_bench/method/adamerging.

Rule: θ = θ0 + Σ_t λ_t^l τ_t^l, λ = argmin_λ Σ_t H(softmax(f_t(X_t; θ))) on unlabelled test batches X_t of each task;
one λ_t per task ("task") or per task and parameter tensor ("layer", the official meaning of layer). λ starts at 0.3
and is clamped to [0, 1] where it is used (Adam updates the raw value, so a clamped coefficient gets no gradient),
Adam lr 1e-3, 500 steps, as in the official scripts. Heads are per task and not merged (``logits=``).

Deviations: one batch per task per step (as FusionBench; the official loop reads two batches of 16 per task), of the
size the user's loaders give; the model runs in eval mode (no dropout); every floating-point parameter is merged
(FusionBench skips parameters with requires_grad=False). FusionBench's defaults differ (1000 steps, no clamp):
``steps=1000, clamp=None``. Not built in: AdaMerging++ (AdaMerging on TIES-trimmed task vectors) -- pass
θ0 + TIES(τ_t) as the models to get it.

Example (a shared MiniLM backbone, each task with its own classifier head on mean-pooled states)::

    def pool(out, x):  # masked mean of the last hidden state
        m = x["attention_mask"][..., None].to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * m).sum(1) / m.sum(1)

    sd = ss.merge("adamerging", base=backbone, models=[sd_a, sd_b], data=[loader_a, loader_b],
                  logits=[lambda o, x: head_a(pool(o, x)), lambda o, x: head_b(pool(o, x))])
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import MERGE
from ._learned import (Batches, LearnedMerge, merge_params, merged_state_dict, minimize_entropy, prepare,
                       run_learned)

__all__ = ["AdaMerging", "adamerging", "fit_coefficients"]
PAPER = "https://arxiv.org/abs/2310.02575"
GRANULARITIES = ("task", "layer")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaMerging:
    """Hyperparameters (official defaults): coefficient granularity, initial value, clamp range, Adam steps and lr."""
    granularity: str = "layer"
    init: float = 0.3
    clamp: tuple[float, float] | None = (0.0, 1.0)
    steps: int = 500
    lr: float = 1e-3

    def __post_init__(self) -> None:
        check(self, "adamerging")


def check(cfg: Any, method: str) -> None:
    """Validation shared with Concrete's AdaMerging settings."""
    if cfg.granularity not in GRANULARITIES:
        raise SubspacesError(f"{method}: granularity={cfg.granularity!r}; allowed: 'task', 'layer'")
    if cfg.clamp is not None:
        try:
            lo, hi = (float(v) for v in cfg.clamp)
        except (TypeError, ValueError):
            lo = hi = float("nan")
        if not lo <= hi:
            raise SubspacesError(f"{method}: clamp={cfg.clamp!r}; allowed: None or (low, high) with low <= high")
        object.__setattr__(cfg, "clamp", (lo, hi))
    for name in ("steps", "adamerging_steps"):
        v = getattr(cfg, name, 0)
        if v is not None and not (isinstance(v, int) and v >= 0):
            raise SubspacesError(f"{method}: {name}={v!r}; allowed: an integer >= 0")
    for name in ("lr", "base_lr", "adamerging_lr"):
        v = getattr(cfg, name, 1.0)
        if not (isinstance(v, (int, float)) and v > 0):
            raise SubspacesError(f"{method}: {name}={v!r}; allowed: a number > 0")


def init_coefficients(n_tasks: int, n_blocks: int, granularity: str, init: float,
                      device: torch.device) -> torch.Tensor:
    """λ at its initial value: (T,) task-wise, (T, P) layer-wise (P = number of parameter tensors)."""
    shape = (n_tasks,) if granularity == "task" else (n_tasks, n_blocks)
    return torch.full(shape, float(init), device=device)


def applied(raw: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    return raw if clamp is None else raw.clamp(*clamp)


def fit_coefficients(model: nn.Module, tvs: Sequence[Mapping[str, torch.Tensor]], batches: Batches,
                     fns: Sequence[Callable], *, granularity: str = "layer", init: float = 0.3,
                     clamp: tuple[float, float] | None = (0.0, 1.0), steps: int = 500, lr: float = 1e-3,
                     mask: Mapping[str, torch.Tensor] | None = None,
                     progress: bool = False) -> tuple[torch.Tensor, list[float]]:
    """AdaMerging's test-time adaptation: (λ as applied, summed entropy per step). ``mask`` (fixed) multiplies every
    task vector (Concrete AdaMerging's second phase)."""
    base = {k: p.detach() for k, p in model.named_parameters()}
    device = next(iter(tvs[0].values())).device
    raw = init_coefficients(len(tvs), len(tvs[0]), granularity, init, device).requires_grad_()
    losses = minimize_entropy(model, lambda: merge_params(base, tvs, applied(raw, clamp), mask=mask), [raw],
                              batches, fns, n_steps=steps, lr=lr, progress=progress, desc="AdaMerging")
    return applied(raw, clamp).detach(), losses


def adamerging(model: nn.Module, models: Sequence[Any] | Mapping[str, Any], data: Sequence[Any] | None = None, *,
               logits: Any = None, progress: bool = False, **hp: Any) -> LearnedMerge:
    """AdaMerging of ``models`` (state dicts, safetensors paths or modules) into ``model`` (θ0, run as is).

    ``data``: one iterable of unlabelled batches per model (restarted when exhausted); ``logits``: per task a callable
    ``head(output)`` or ``head(output, inputs)`` giving that task's logits (default: the output or its ``.logits``).
    ``models``, ``data`` and ``logits`` may be dicts with the same keys. Hyperparameters: the fields of
    :class:`AdaMerging`. Returns the merged state dict (``model`` is not modified), λ and the loss per step."""
    job = prepare("adamerging", AdaMerging, model, models, data, logits, hp)
    cfg = job.config
    coef, losses = fit_coefficients(model, job.tvs, job.batches, job.fns, granularity=cfg.granularity,
                                    init=cfg.init, clamp=cfg.clamp, steps=cfg.steps, lr=cfg.lr, progress=progress)
    with torch.no_grad():
        params = merge_params({k: p.detach() for k, p in model.named_parameters()}, job.tvs, coef)
    return LearnedMerge(merged_state_dict(model, params), coef, losses)


MERGE.register("adamerging", paper=PAPER, status="partial",
               note="AdaMerging++ (TIES-trimmed task vectors) is not built in")(adamerging)
adamerging.kind = "learned"
adamerging.config = AdaMerging  # its hyperparameters
adamerging.run = functools.partial(run_learned, "adamerging", adamerging)
