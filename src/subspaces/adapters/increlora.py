"""IncreLoRA: Incremental Parameter Allocation Method for Parameter-Efficient Fine-tuning (Zhang et al., 2023).
https://arxiv.org/abs/2308.12043

Update rule (AdaLoRA's SVD shape): y = W0 x + b + s/(ranknum + 1e-5) · B diag(E) A dropout(x), s = alpha, held as
nn.ParameterList pieces: ``A.0``/``E.0``/``B.0`` the initial rank-``rank`` block, then one rank-1 piece per added
rank; ranknum = active rank; E = 0, A, B ~ N(0, 0.02²) at init (ΔW = 0). Official code:
https://github.com/FeiyuZhang98/IncreLoRA (``loralib/loralib/increlora.py``: ``SVDLinear``, ``RankAllocator``).
Schedule (``ss.adapters.step`` after each optimizer step, ``AdapterSchedule`` in a Trainer; t counted from 0):
module importance I = Σ|ΔW ⊙ ∂L/∂ΔW| / √numel(ΔW) (from the forward's ΔW in backward, as the code's hook),
Ī ← β1 Ī + (1−β1) I, Ū ← β2 Ū + (1−β2)|I − Ī|, score Ī·Ū. Advance learning: each module holds ``add_r`` reserve
pieces whose a, b train while e is frozen at 1e-5; every ``incre_interval`` steps after ``init_warmup`` the
``top_h`` best modules switch reserves on (e trainable, ranknum += add_r) and get fresh ones, until the total rank
is target_rank × #modules; then the reserves' e are zeroed. ``ss.adapters.penalty``: orth_reg_weight · mean over
every piece of ‖PPᵀ − I‖_F (per piece as the code, so a rank-1 piece is only pushed to unit norm).
Checkpoints hold the grown shapes (``prepare_load`` recreates the pieces); the EMA scores are not saved.

Defaults: the README's (rank 1, target_rank 2, top_h 2, β 0.85, γ 0.1, α 16, add_r = {2:1, 4:2, 6:3, 8:4}
[target_rank]) but ``init_warmup=10``, ``incre_interval=5`` steps (the README's 1000/1000 suit ~110k steps): a
~150-step run on 24 modules grows until step ~70, after a warmup as long as the harness's LR warmup; dropout 0.
Deviations: new tensors join the optimizer param group holding the layer's ``A.0`` (the code's ``add_param_group``
makes groups the HF LambdaLR never drives; a group is added only if none holds it). Reserves exist from init with
e = 0 (ΔW = 0, a fixed trainable count: block + reserves' a, b) and get e = 1e-5 at the first step(), where the
code creates them. The last round makes no reserves (they would be zeroed); zeroed reserves then leave the forward.
The budget is never exceeded: the last modules grow by what is left (the code overshoots by up to add_r − 1, and
on tied scores).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import AdapterConfig, Delta, check_int, linear_dims, validate_common
from ._svd_triplets import TripletDelta, check_common, ema_, ema_score, orth_penalty, scaling, \
    svd_forward, svd_weight

ADD_R = {2: 1, 4: 2, 6: 3, 8: 4}  # the code's incre_rank_num for a target_rank
RESERVE_E = 1e-5


@ADAPTERS.register("increlora", paper="https://arxiv.org/abs/2308.12043", status="complete")
@dataclass(frozen=True, kw_only=True)
class IncreLoRA(AdapterConfig):
    """IncreLoRA hyperparameters; ``rank`` is the code's lora_r, ``add_r`` its incre_rank_num."""

    rank: int = 1
    target_rank: int = 2
    add_r: int | None = None
    top_h: int = 2
    init_warmup: int = 10
    incre_interval: int = 5
    advance_learn: bool = True
    alpha: float = 16.0
    dropout: float = 0.0
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1

    def __post_init__(self) -> None:
        validate_common(self)
        check_common(self)
        check_int("increlora", "target_rank", self.target_rank, self.rank)
        if self.add_r is None and self.target_rank not in ADD_R:
            raise SubspacesError(f"increlora target_rank={self.target_rank}: give add_r (the code's default "
                                 f"covers target_rank in {sorted(ADD_R)})")
        if self.add_r is not None:
            check_int("increlora", "add_r", self.add_r, 1)
        for name, low in (("top_h", 1), ("init_warmup", 0), ("incre_interval", 1)):
            check_int("increlora", name, getattr(self, name), low)
        if not isinstance(self.advance_learn, bool):
            raise SubspacesError(f"increlora advance_learn={self.advance_learn!r}: must be True or False")

    @property
    def reserve(self) -> int:
        return self.add_r if self.add_r is not None else ADD_R[self.target_rank]

    def num_trainable(self, layer: nn.Module) -> int:
        """The initial block (a, e, b) plus, with advance learning, the reserves' a and b (their e is frozen)."""
        d_in, d_out, _ = linear_dims(layer, "increlora")
        return self.rank * (d_in + d_out + 1) + (self.reserve * (d_in + d_out) if self.advance_learn else 0)

    def build(self, layer: nn.Module, *, init: bool = True) -> IncreLoRADelta:
        return IncreLoRADelta(layer, self)  # the pieces are drawn at construction (cheap)

    @classmethod
    def penalty(cls, deltas: list[Delta]) -> torch.Tensor | None:
        factors = [f for d in deltas for f in [*(("A", a) for a in d.A), *(("B", b) for b in d.B)]]
        return orth_penalty(factors, deltas[0].config.orth_reg_weight)

    @classmethod
    def after_step(cls, deltas: list[Delta], *, lr: float | None, optimizer=None) -> None:
        cfg = deltas[0].config
        t, target = deltas[0].t, cfg.target_rank * len(deltas)
        left = target - sum(d.rank for d in deltas)
        if t == 0 and cfg.advance_learn and left > 0:
            for d in deltas:
                d.set_reserve_e(RESERVE_E)  # advance learning starts (the code adds its reserves here)
        if left > 0:
            for d in deltas:
                d.update_ipt(cfg.beta1, cfg.beta2)
            if t > cfg.init_warmup and t % cfg.incre_interval == 0:
                grow(deltas, left, optimizer)
        elif deltas[0].growing:
            for d in deltas:
                d.set_reserve_e(0.0, done=True)
        for d in deltas:
            d.tick()


def grow(deltas: list[IncreLoRADelta], left: int, optimizer) -> None:
    """Give ``add_r`` more rank to the ``top_h`` best-scoring modules (never beyond the budget ``left``)."""
    if optimizer is None:
        raise SubspacesError("increlora grows new trainable tensors: pass the optimizer, "
                             "ss.adapters.step(model, lr=..., optimizer=optimizer)")
    cfg = deltas[0].config
    dev = deltas[0].ranknum.device
    scores = torch.stack([d.importance().to(dev) for d in deltas])
    plan = []
    for i in torch.topk(scores, min(cfg.top_h, len(deltas), left)).indices.tolist():
        n = min(cfg.reserve, left - sum(n for _, n in plan))
        if n > 0:
            plan.append((deltas[i], n))
    last = sum(n for _, n in plan) == left
    known = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for d, n in plan:
        new = [p for p in d.grow_(n, reserves=not last) if id(p) not in known]
        group = next((g for g in optimizer.param_groups if any(p is d.A[0] for p in g["params"])), None)
        if group is not None:
            group["params"].extend(new)
        elif new:
            optimizer.add_param_group({"params": new})
    for d in deltas if last else []:
        d.set_reserve_e(0.0, done=True)


class IncreLoRADelta(TripletDelta):
    """ΔW = s/(ranknum + 1e-5) · [b_0 … b_k] diag([e_0 … e_k]) [a_0; …; a_k] over nn.ParameterList pieces."""

    def __init__(self, layer: nn.Module, config: IncreLoRA) -> None:
        super().__init__()
        d_in, d_out, self.transposed = linear_dims(layer, "increlora")
        self.dims, self.r0, self.cfg = (d_in, d_out), config.rank, config
        self.s = scaling(config.alpha, config.rank)
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self._init_counters(layer, config.rank)
        self.rank, self.growing, self.score = config.rank, True, None  # rank mirrors ranknum (no device sync)
        self._pieces(1 + config.reserve, config.rank)

    @property
    def kw(self) -> dict:  # where new pieces go: follows the module through .to()
        return dict(device=self.ranknum.device, dtype=self.ranknum.dtype)

    def _pieces(self, n: int, rows: int) -> None:
        """The initial block (trainable) and ``n - 1`` rank-1 reserves with e = 0."""
        self.A, self.E, self.B = nn.ParameterList(), nn.ParameterList(), nn.ParameterList()
        for p in (*self._append(rows, 0.0), self.E[0]):
            p.requires_grad_(True)
        for _ in range(n - 1):
            self._append(1, 0.0)

    def _append(self, rows: int, e: float) -> list[nn.Parameter]:
        """A new piece, its e frozen at ``e`` (a reserve) and a, b ~ N(0, 0.02²) trainable with advance learning."""
        a = nn.Parameter(torch.empty(rows, self.dims[0], **self.kw).normal_(std=0.02), self.cfg.advance_learn)
        b = nn.Parameter(torch.empty(self.dims[1], rows, **self.kw).normal_(std=0.02), self.cfg.advance_learn)
        self.A.append(a)
        self.E.append(nn.Parameter(torch.full((rows,), e, **self.kw), requires_grad=False))
        self.B.append(b)
        return [a, b]

    def prepare_load(self, state: dict[str, torch.Tensor]) -> None:
        """Recreate the pieces a checkpoint names (grown shapes), with the trainable flags its ranknum implies."""
        self._pieces(sum(1 for k in state if re.fullmatch(r"A\.\d+", k)), state["A.0"].shape[0])
        super().prepare_load(state)
        self.rank = round(float(state["ranknum"]))
        for i in range(1, 1 + self.rank - self.r0):
            for p in (self.A[i], self.E[i], self.B[i]):
                p.requires_grad_(True)

    def grow_(self, n: int, *, reserves: bool) -> list[nn.Parameter]:
        """Switch the first ``n`` reserves on (and append ``n`` fresh ones); returns the new trainable tensors."""
        new = []
        for i in range(1 + self.rank - self.r0, 1 + self.rank - self.r0 + n):
            for p in (self.A[i], self.E[i], self.B[i]):
                if not p.requires_grad:
                    p.requires_grad_(True)
                    new.append(p)
        self.rank += n
        self.ranknum.fill_(self.rank)
        for _ in range(n if reserves else 0):
            new += [p for p in self._append(1, RESERVE_E if self.cfg.advance_learn else 0.0) if p.requires_grad]
        return new

    def set_reserve_e(self, value: float, *, done: bool = False) -> None:
        for e in self.E[1 + self.rank - self.r0:]:
            e.fill_(value)
        self.growing = not done

    def update_ipt(self, beta1: float, beta2: float) -> None:
        ipt = self.score if self.score is not None else torch.zeros((), **self.kw)
        ema_(self, "ipt", ipt, beta1, beta2)

    def importance(self) -> torch.Tensor:
        return ema_score(self, "ipt")

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        k = len(self.A) if self.growing else 1 + self.rank - self.r0  # spent reserves leave the forward
        return torch.cat(list(self.A[:k])), torch.cat(list(self.E[:k])), torch.cat(list(self.B[:k]), dim=1)

    def _capture(self, dw: torch.Tensor, grad: torch.Tensor) -> None:
        self.score = (dw * grad).abs().sum() / math.sqrt(dw.numel())

    def weight(self) -> torch.Tensor:
        dw = svd_weight(*self._factors(), self.s, self.ranknum)
        return dw.T if self.transposed else dw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.kw["dtype"])
        x = self.drop(x) if self.drop is not None else x
        A, E, B = self._factors()
        if self.growing and self.training and torch.is_grad_enabled():
            dw = svd_weight(A, E, B, self.s, self.ranknum)  # formed, as the code's, for the importance hook
            if dw.requires_grad:
                dw.register_hook(lambda g, w=dw.detach(): self._capture(w, g))
            return x @ dw.T
        return svd_forward(x, A, E, B, self.s, self.ranknum)
