"""SoRA: Sparse Low-rank Adaptation of Pre-trained Language Models (Ding et al., EMNLP 2023).
https://arxiv.org/abs/2311.11696

Update rule: y = W0 x + b + s · B (g ⊙ (A dropout(x))), s = α / r_max; after each optimizer step the gate takes a
proximal (soft-threshold) step g ← sign(g)·max(|g| − ξ, 0), so whole rank components switch off and the adapter
ends as a LoRA of per-module rank nnz(g) (``ss.export_lora`` writes exactly that, with PEFT's rank_pattern).
Official code: https://github.com/TsinghuaC3I/SoRA (``src/lora.py``, ``src/sparse_optimizer.py``,
``src/trainer.py``).

As the official code (the default, ``threshold="constant"``): gates take an ordinary AdamW step with no weight
decay (``Delta.no_decay``; ``ss.adapters.param_groups`` builds the optimizer groups), then the threshold ξ, not
multiplied by the learning rate; ``threshold="lr_scaled"`` is the paper's form η_t·ξ. The code's extra L1 term
``l1 · Σ|g| / numel(g)`` over all gates is ``ss.adapters.penalty``.
Deviations: gates share the main optimizer and learning rate (the code's default sparse_lr equals the main lr)
instead of a second optimizer. Only nn.Linear layers.

The sparsifying scheduler (paper Alg. 1, the code's ``--lambda_schedule linear``): after a first run, ``sparsify``
raises ξ through ``xi_schedule(ξ_0, ξ_max, n)[1:]`` and calls the user's ``train`` (the code: 15 more epochs, no
best-model reload) and ``evaluate`` at each value, recording the metric against the remaining rank components and
their LoRA-equivalent parameters. The code's ``log_linear``/``exp_linear`` spacings are not provided.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import AdapterConfig, Delta, master_dtype, validate_common

_THRESHOLDS = ("constant", "lr_scaled")


@ADAPTERS.register("sora", paper="https://arxiv.org/abs/2311.11696")
@dataclass(frozen=True, kw_only=True)
class SoRA(AdapterConfig):
    """SoRA hyperparameters: ``rank`` is r_max; ``xi`` the gate threshold; ``l1`` the extra L1 weight."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    xi: float = 3e-4
    l1: float = 0.0
    threshold: str = "constant"

    def __post_init__(self) -> None:
        validate_common(self)
        if self.xi < 0 or self.l1 < 0:
            raise SubspacesError(f"sora xi={self.xi!r}, l1={self.l1!r}: must be >= 0")
        if self.threshold not in _THRESHOLDS:
            raise SubspacesError(f"sora threshold={self.threshold!r}: allowed {', '.join(_THRESHOLDS)}")

    def num_trainable(self, layer: nn.Module) -> int:
        return self.rank * (layer.in_features + layer.out_features + 1)

    def build(self, layer: nn.Module, *, init: bool = True) -> SoRADelta:
        if not isinstance(layer, nn.Linear):
            raise SubspacesError(f"sora adapts nn.Linear layers, not {type(layer).__name__}")
        if self.rank >= min(layer.in_features, layer.out_features):
            raise SubspacesError(f"sora rank={self.rank} must be < min(d_in, d_out) = "
                                 f"{min(layer.in_features, layer.out_features)}")
        delta = SoRADelta(layer, self)
        if init:
            delta.reset()
        return delta

    @classmethod
    def penalty(cls, deltas: list[Delta]) -> torch.Tensor | None:
        weight = deltas[0].config.l1
        if weight == 0:
            return None
        gates = [d.g for d in deltas]
        return weight * sum(g.abs().sum() for g in gates) / sum(g.numel() for g in gates)

    @classmethod
    def after_step(cls, deltas: list[Delta], *, lr: float | None, optimizer=None) -> None:
        for d in deltas:
            xi = d.config.xi
            if d.config.threshold == "lr_scaled":
                if lr is None:
                    raise SubspacesError("sora threshold='lr_scaled' needs the learning rate: step(model, lr=...)")
                xi = xi * lr
            d.g.copy_(soft_threshold(d.g, xi))


def xi_schedule(start: float, stop: float, num: int) -> list[float]:
    """The ξ values of the sparsifying scheduler: ``linspace(start, stop, num)`` (the code's linear schedule)."""
    if num < 1 or not 0 <= start <= stop:
        raise SubspacesError(f"xi_schedule({start}, {stop}, {num}): needs 0 <= start <= stop and num >= 1")
    return [start + (stop - start) * i / max(num - 1, 1) for i in range(num)]


def _sora_deltas(model: nn.Module) -> list[SoRADelta]:
    from ._core import DELTA, adapted_layers

    deltas = [layer._modules[DELTA] for _, layer in adapted_layers(model)]
    deltas = [d for d in deltas if isinstance(d, SoRADelta)]
    if not deltas:
        raise SubspacesError("the model has no SoRA adapter")
    return deltas


def set_xi_(model: nn.Module, xi: float) -> None:
    """Use threshold ``xi`` from the next step on, in every SoRA layer of ``model`` (saved with the adapter)."""
    for d in _sora_deltas(model):
        d.config = dataclasses.replace(d.config, xi=xi)


def sparsity(model: nn.Module) -> dict[str, int]:
    """Remaining rank components (non-zero gates) and their LoRA-equivalent parameters Σ nnz(g)·(d_in + d_out)."""
    deltas = _sora_deltas(model)
    nnz = [int((d.g != 0).sum()) for d in deltas]
    return {"ranks": sum(nnz), "max_ranks": sum(d.g.numel() for d in deltas),
            "params": sum(n * (d.A.shape[1] + d.B.shape[0]) for n, d in zip(nnz, deltas))}


def sparsify(model: nn.Module, xis: list[float], *, train: Callable[[nn.Module], Any],
             evaluate: Callable[[nn.Module], float] | None = None) -> list[dict[str, Any]]:
    """Paper Alg. 1 after the first run: for each ξ in turn, ``set_xi_``, ``train(model)``, then record ξ, the
    ``sparsity`` and ``evaluate(model)``. ``train`` is the user's loop or Trainer call (with ``ss.adapters.step``
    or ``AdapterSchedule``), which continues from the current weights."""
    history = []
    for xi in xis:
        set_xi_(model, xi)
        train(model)
        row = {"xi": xi, **sparsity(model)}
        if evaluate is not None:
            row["metric"] = evaluate(model)
        history.append(row)
    return history


def soft_threshold(z: torch.Tensor, xi: float) -> torch.Tensor:
    """T_ξ(z) = sign(z) · max(|z| − ξ, 0): the proximal map of ξ‖·‖₁."""
    return torch.sign(z) * (z.abs() - xi).clamp_min(0)


class SoRADelta(Delta):
    no_decay = ("g",)

    def __init__(self, layer: nn.Linear, config: SoRA) -> None:
        super().__init__()
        w = layer.weight
        dtype = master_dtype(w)
        kw = dict(device=w.device, dtype=dtype)
        r = config.rank
        self.A = nn.Parameter(torch.zeros(r, layer.in_features, **kw))
        self.B = nn.Parameter(torch.zeros(layer.out_features, r, **kw))
        self.g = nn.Parameter(torch.zeros(r, **kw))
        self.scaling = config.alpha / r
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @torch.no_grad()
    def reset(self) -> None:
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        nn.init.zeros_(self.B)  # ΔW = 0 at init whatever the gate
        nn.init.normal_(self.g)

    def weight(self) -> torch.Tensor:
        return (self.B * self.g) @ self.A * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        x = self.drop(x) if self.drop is not None else x
        return F.linear(F.linear(x, self.A) * self.g, self.B) * self.scaling

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dt = output.dtype
        x = x if x.dtype == dt else x.to(dt)
        x = self.drop(x) if self.drop is not None else x
        h = F.linear(x, self.A.to(dt)) * self.g.to(dt)
        return output + F.linear(h, self.B.to(dt)) * self.scaling
