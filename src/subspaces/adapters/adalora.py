"""AdaLoRA: Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning (Zhang et al., ICLR 2023).
https://arxiv.org/abs/2303.10512

Update rule: y = W0 x + b + s/(ranknum + 1e-5) · B diag(E) A dropout(x), A ∈ R^{r×d_in}, E ∈ R^r, B ∈ R^{d_out×r},
r = ranknum = init_r (fixed, as PEFT and the official code), E = 0 and A, B ~ N(0, 0.02²) at init (ΔW = 0).
Schedule as PEFT's ``tuners/adalora`` (``RankAllocator``, ``AdaLoraModel.update_and_allocate``), run by
``ss.adapters.step`` after each optimizer step (``AdapterSchedule`` in a Trainer), t counted from 0 as PEFT's
example loop: sensitivity I = |w · ∂L/∂w| per entry of A, E, B; Ī ← β1 Ī + (1−β1) I, Ū ← β2 Ū + (1−β2)|I − Ī|;
triplet score S_i = Ī·Ū(E_i) + mean_j Ī·Ū(A_ij) + mean_j Ī·Ū(B_ji); budget b(t) = b_0 = init_r·n up to t_init,
b_T + (b_0 − b_T)(1 − (t − t_init)/(T − t_final − t_init))³ after, b_T = target_r·n from T − t_final on. Every
``delta_t`` steps E_i is zeroed for the triplets scoring at or below the (b_0 − b(t))-th smallest score (A, B rows
are kept and trained). At t = T − t_final the mask is fixed (scores dropped) and re-applied after every later step.
``ss.adapters.penalty``: orth_reg_weight · mean over all A, B of ‖PPᵀ − I‖_F. (Parity with PEFT: tests.)

The mask (buffer ``mask``) and step counter are saved, so a checkpoint reloads to the same per-layer ranks nnz(E)
and continues the schedule (the EMA scores are not saved, as in PEFT); ``ss.export_lora`` writes those ranks.
Defaults are PEFT's (init_r 12, target_r 8, lora_alpha 8, β 0.85, orth_reg_weight 0.5, ΔT 1) but ``tinit`` and
``tfinal`` (an int: steps; a float in [0, 1): a fraction of ``total_steps``) default to 0.1 and 0.5, near the
paper's GLUE scripts (MNLI: 8000 and 50000 of ~86k steps), where PEFT's 0 and 0 prune from the first step to the
last. ``total_steps`` (PEFT's total_step) is filled by the harness; step() needs it. Layers: nn.Linear, GPT-2 Conv1D.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import AdapterConfig, Delta, check_int, linear_dims, master_dtype, validate_common
from ._svd_triplets import TripletDelta, check_common, drop_ema, ema_, ema_score, orth_penalty, scaling, \
    svd_forward, svd_weight


@ADAPTERS.register("adalora", paper="https://arxiv.org/abs/2303.10512", status="complete")
@dataclass(frozen=True, kw_only=True)
class AdaLoRA(AdapterConfig):
    """AdaLoRA hyperparameters (PEFT's names; ``delta_t`` is PEFT's ``deltaT``)."""

    init_r: int = 12
    target_r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int | float = 0.1
    tfinal: int | float = 0.5
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_steps: int | None = None

    def __post_init__(self) -> None:
        validate_common(self)
        check_common(self)
        for name in ("init_r", "target_r", "delta_t"):
            check_int("adalora", name, getattr(self, name), 1)
        if self.target_r > self.init_r:
            raise SubspacesError(f"adalora target_r={self.target_r} must be <= init_r={self.init_r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, int) and v >= 0 or isinstance(v, float) and 0 <= v < 1):
                raise SubspacesError(f"adalora {name}={v!r}: an int >= 0 (steps) or a float in [0, 1) (a fraction "
                                     "of total_steps)")
        if self.total_steps is not None:
            check_int("adalora", "total_steps", self.total_steps, 1)
            self.schedule()

    def schedule(self) -> tuple[int, int, int]:
        """(t_init, t_final, T) in steps."""
        T = self.total_steps
        if T is None:
            raise SubspacesError("adalora needs total_steps (the run's number of optimizer steps) for its budget "
                                 "schedule: adapt with total_steps=... (the harness fills it)")
        tinit, tfinal = (v if isinstance(v, int) else round(v * T) for v in (self.tinit, self.tfinal))
        if tinit >= T - tfinal:
            raise SubspacesError(f"adalora tinit={self.tinit!r}, tfinal={self.tfinal!r}, total_steps={T}: no "
                                 f"budgeting phase is left (t_init {tinit} >= T - t_final {T - tfinal})")
        return tinit, tfinal, T

    @property
    def scaling(self) -> float:
        return scaling(self.alpha, self.init_r)

    def num_trainable(self, layer: nn.Module) -> int:
        d_in, d_out, _ = linear_dims(layer, "adalora")
        return self.init_r * (d_in + d_out + 1)

    def build(self, layer: nn.Module, *, init: bool = True) -> AdaLoRADelta:
        delta = AdaLoRADelta(layer, self)
        if init:
            delta.reset()
        return delta

    @classmethod
    def penalty(cls, deltas: list[Delta]) -> torch.Tensor | None:
        factors = [f for d in deltas for f in (("A", d.A), ("B", d.B))]
        return orth_penalty(factors, deltas[0].config.orth_reg_weight)

    @classmethod
    def after_step(cls, deltas: list[Delta], *, lr: float | None, optimizer=None) -> None:
        cfg = deltas[0].config
        tinit, tfinal, T = cfg.schedule()
        t, end = deltas[0].t, T - tfinal
        init_bgt, target_bgt = sum(d.E.numel() for d in deltas), cfg.target_r * len(deltas)
        if t < end:
            for d in deltas:
                d.update_ipt(cfg.beta1, cfg.beta2)
            b, mask = budget_schedule(t, init_bgt, target_bgt, tinit, tfinal, T, cfg.delta_t)
            if mask:
                mask_to_budget(deltas, b)
        elif t == end and all(ema_score(d, "E") is not None for d in deltas):
            mask_to_budget(deltas, target_bgt)  # the final allocation (PEFT's force_mask); scores are dropped
            for d in deltas:
                for name in ("A", "E", "B"):
                    drop_ema(d, name)
        else:
            for d in deltas:
                d.E.masked_fill_(~d.mask, 0.0)
        for d in deltas:
            d.tick()


def budget_schedule(t: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, T: int,
                    delta_t: int) -> tuple[int, bool]:
    """(budget b(t), whether to mask at step t): PEFT's ``RankAllocator.budget_schedule``."""
    if t <= tinit:
        return init_bgt, False
    if t > T - tfinal:
        return target_bgt, True
    mul = 1 - (t - tinit) / (T - tfinal - tinit)
    return int((init_bgt - target_bgt) * mul**3 + target_bgt), t % delta_t == 0


@torch.no_grad()
def mask_to_budget(deltas: list[AdaLoRADelta], budget: int) -> None:
    """Zero E_i of every triplet scoring at or below the (b_0 − budget)-th smallest score over all layers."""
    scores = [d.triplet_scores() for d in deltas]
    k = sum(s.numel() for s in scores) - budget
    if k <= 0:
        return
    dev = scores[0].device
    threshold = torch.kthvalue(torch.cat([s.to(dev) for s in scores]), k).values
    for d, s in zip(deltas, scores):
        keep = s > threshold.to(s.device)
        d.E.masked_fill_(~keep, 0.0)
        d.mask.copy_(keep)


class AdaLoRADelta(TripletDelta):
    """ΔW = s/(ranknum + 1e-5) · B diag(E) A with a saved triplet mask and step counter."""

    def __init__(self, layer: nn.Module, config: AdaLoRA) -> None:
        super().__init__()
        d_in, d_out, self.transposed = linear_dims(layer, "adalora")
        w = layer.weight
        kw = dict(device=w.device, dtype=master_dtype(w))
        r = config.init_r
        self.A = nn.Parameter(torch.zeros(r, d_in, **kw))
        self.E = nn.Parameter(torch.zeros(r, **kw))
        self.B = nn.Parameter(torch.zeros(d_out, r, **kw))
        self._init_counters(layer, r)
        self.register_buffer("mask", torch.ones(r, dtype=torch.bool, device=w.device))
        self.s = config.scaling
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None

    @torch.no_grad()
    def reset(self) -> None:
        nn.init.normal_(self.A, std=0.02)
        nn.init.normal_(self.B, std=0.02)
        self.E.zero_()

    @property
    def rank(self) -> int:
        """Triplets kept by the mask (the layer's effective rank)."""
        return int(self.mask.sum())

    def update_ipt(self, beta1: float, beta2: float) -> None:
        for name in ("A", "E", "B"):
            p = getattr(self, name)
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            ema_(self, name, (p * g).abs(), beta1, beta2)

    def triplet_scores(self) -> torch.Tensor:
        """S_i = s(E_i) + (mean_j s(A_ij) + mean_j s(B_ji)), PEFT's order of operations."""
        return ema_score(self, "E") + (ema_score(self, "A").mean(dim=1) + ema_score(self, "B").mean(dim=0))

    def weight(self) -> torch.Tensor:
        dw = svd_weight(self.A, self.E, self.B, self.s, self.ranknum)
        return dw.T if self.transposed else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.A.dtype)
        x = self.drop(x) if self.drop is not None else x
        return svd_forward(x, self.A, self.E, self.B, self.s, self.ranknum)
