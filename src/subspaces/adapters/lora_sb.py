"""LoRA-SB: "Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank
Fine-Tuning" (Ponkshe, Singhal, Gorbunov, Tumanov, Horváth, Vepakomma, 2024). https://arxiv.org/abs/2411.19557

Update rule: y = W0 x + b + s · B R A dropout(x), only R (r, r) trained (r² parameters per layer), B (d_out, r) and
A (r, d_in) frozen, initialized from the first full-fine-tuning update: ΔW₁ = −η₁ sign(Σ_batches ∇_W L) ≈ U_r Σ_r V_rᵀ,
B = U_r, A = V_rᵀ, R = Σ_r / s (``init_from_gradients_``). W0 is not corrected: at step 0 the model already holds the
approximate first update, so the output differs from the base (``identity_at_init = False``).
Official code: https://github.com/RaghavSinghal10/lora-sb (now CERT-Lab/lora-sb; ``utils/gradient_utils.py``,
``utils/initialization_utils.py``); the architecture is LoRA-XS's (``LatentDelta`` in ``lora_xs.py``).

Use: ``adapt_(model, "lora_sb", rank=..., targets=...)``, then ``init_from_gradients_(model, batches, lr=...,
warmup_steps=...)`` before training. The adapters are bypassed while the gradient is estimated, so it is the base
model's gradient, as in the paper (which estimates it before adding adapters).

Deviations from the paper:
- Plain init (``adapt_`` without data, not in the paper): B = U_r, A = V_rᵀ, the top singular vectors of W0 (both
  orthonormal, as after the gradient init), and R = 0, so the model equals its base exactly; the paper always uses
  the gradient init, so call ``init_from_gradients_`` for LoRA-SB proper.
- The SVD of ΔW₁ is exact by default (the best rank-r approximation); the official code uses
  ``torch.svd_lowrank(q=r, niter=10)``, available as ``svd="randomized"`` (10 power iterations, oversampled).
- The gradient is the sum over the given batches of ∇ loss_fn(model, batch); the official code sums per-sample
  gradients (pass batches of one example to match exactly; sign() ignores a common positive scale).
- α is free (default None: α = rank, s = 1, which the official code forces); R = Σ_r / s keeps the init independent
  of α. On bf16/fp16 bases B, R, A stay fp32 (the official code casts them to bf16). Layers: Linear, GPT-2 Conv1D.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import DELTA, AdapterConfig, adapted_layers
from .lora_xs import LatentDelta, check_common, check_rank

_SVDS = ("exact", "randomized")


@ADAPTERS.register("lora_sb", paper="https://arxiv.org/abs/2411.19557")
@dataclass(frozen=True, kw_only=True)
class LoRASB(AdapterConfig):
    """LoRA-SB hyperparameters. ``alpha=None`` means α = rank (s = 1), the paper's setting."""

    #: The paper's init (``init_from_gradients_``) starts from ΔW = ΔW₁ ≠ 0.
    identity_at_init: ClassVar[bool] = False

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_common(self)

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def num_trainable(self, layer: nn.Module) -> int:
        return self.rank * self.rank

    def build(self, layer: nn.Module, *, init: bool = True) -> LatentDelta:
        check_rank("lora_sb", self.rank, layer)
        delta = LatentDelta(layer, self.rank, self.scaling, self.dropout)
        if init:
            _set_factors(delta, delta.matrix(layer), with_values=False)
        return delta


@torch.no_grad()
def _set_factors(delta: LatentDelta, M: torch.Tensor, *, with_values: bool = True, svd: str = "exact") -> None:
    """B = U_r, A = V_rᵀ from the truncated SVD of ``M`` (d_out, d_in); R = Σ_r / s, or 0 without ``with_values``."""
    from ..linalg import truncated_svd

    kw = dict(method="randomized", n_iter=10) if svd == "randomized" else {}
    U, S, Vh = truncated_svd(M.to(delta.R.dtype), delta.R.shape[0], **kw)
    delta.B.copy_(U)
    delta.A.copy_(Vh)
    delta.R.copy_(torch.diag(S) / delta.scaling if with_values else torch.zeros_like(delta.R))


def _default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise SubspacesError("init_from_gradients_: the model output has no .loss (pass labels in the batch, or "
                             "give loss_fn(model, batch) -> scalar tensor)")
    return loss


def init_from_gradients_(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    lr: float,
    warmup_steps: float = 1.0,
    svd: str = "exact",
) -> nn.Module:
    """LoRA-SB's initialization of every ``lora_sb`` adapter of ``model`` (in place; call it after ``adapt_``).

    Estimates Ĝ = Σ_batches ∇_W loss_fn(model, batch) for each adapted weight with the adapters bypassed and the
    model in train mode (as the official code), approximates the first Adam step of a linear warmup as
    ΔW₁ = −η₁ sign(Ĝ) with η₁ = lr / warmup_steps (the official code: warmup_ratio · total_steps), and sets
    B = U_r, A = V_rᵀ, R = Σ_r / s from the truncated SVD of ΔW₁. ``loss_fn`` defaults to ``model(**batch).loss``.
    Base weights and every other parameter keep their values, ``requires_grad`` flags and ``.grad``; memory: one
    fp32 accumulator per adapted weight. The model's output then includes ΔW₁ (not the base output).
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0:
        raise SubspacesError(f"init_from_gradients_ lr={lr!r}: must be a positive number")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, float)) or warmup_steps <= 0:
        raise SubspacesError(f"init_from_gradients_ warmup_steps={warmup_steps!r}: must be a positive number")
    if svd not in _SVDS:
        raise SubspacesError(f"init_from_gradients_ svd={svd!r}: allowed {', '.join(_SVDS)}")
    layers = [m for _, m in adapted_layers(model) if isinstance(m._modules[DELTA].config, LoRASB)]
    if not layers:
        raise SubspacesError("init_from_gradients_: the model has no lora_sb adapter; call "
                             "ss.adapt_(model, 'lora_sb', targets=...) first")
    loss_fn = loss_fn or _default_loss
    deltas = [m._modules[DELTA] for m in layers]
    weights = [m.weight for m in layers]
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    flags = [w.requires_grad for w in weights]
    active = [d.active for d in deltas]
    modes = [(m, m.training) for m in model.modules()]
    count = 0
    try:
        for d in deltas:
            d.active = False
        for w in weights:
            w.requires_grad_(True)
        model.train()
        for batch in batches:
            # autograd.grad: no .grad is written anywhere (modules_to_save and the base stay untouched)
            step = torch.autograd.grad(loss_fn(model, batch), weights, allow_unused=True)
            for acc, g in zip(grads, step):
                if g is not None:
                    acc.add_(g.float())
            count += 1
    finally:
        for d, a in zip(deltas, active):
            d.active = a
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
        for m, t in modes:
            m.training = t
    if count == 0:
        raise SubspacesError("init_from_gradients_: batches is empty; give at least one batch")
    eta = lr / warmup_steps
    for d, g in zip(deltas, grads):
        update = -eta * torch.sign(g)  # ΔW₁ in the weight's layout
        _set_factors(d, update.T if d.transposed else update, svd=svd)
    return model


LoRASB.data_init = staticmethod(init_from_gradients_)
