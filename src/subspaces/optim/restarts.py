"""Weight refactorization + momentum reset ("restarts") for low-rank pretraining (Glentis et al., 2025).

"Scalable Parameter and Memory Efficient Pretraining for LLM: Recent Algorithmic Advances and Benchmarking",
https://arxiv.org/abs/2505.22922 — code https://github.com/OptimAI-Lab/Memory_Efficient_Pretraining

Every T_ref steps each factored weight ``B A`` (``ss.nn.LowRankLinear`` or SLTrain's ``SLLinear``) is replaced by its
balanced factorization ``B ← U Σ^½, A ← Σ^½ Vᵀ`` (``B A = U Σ Vᵀ``, via QR of B and Aᵀ and the SVD of the r×r core,
O((m+n)r² + r³)); every T_reset steps the AdamW moments are zeroed (and the step counter, so bias correction restarts).

Choices and deviations (the released code has no refactorization function; this follows the paper's text):
- A scale s (SLTrain's alpha / r) is a common factor of both blocks, so the balanced point in the optimizer's
  coordinates is ``BᵀB = A Aᵀ`` of the unscaled product: we balance ``B A`` and keep s, hence ``s·B'A' = s·BA``.
- At a refactorization step the moments of the refactored factors are reset even if T_reset is off (they no
  longer match the new coordinates, the paper's step 3); a T_reset step resets every parameter.
- Layers are skipped (not counted) when ``rank > min(m, n)`` (no bottleneck: a balanced width-r factorization would
  need zero columns, which never train again) or when ``B A = 0`` (SLTrain's B starts at zero).
- base "lowrank" builds ``ss.nn.LowRankLinear`` layers with no scale (``alpha`` is used by base "sltrain" only):
  A ~ U(−1/√n, 1/√n) (nn.Linear's init of (r, n)) and B ~ U(−√(3/r), √(3/r)), so each entry of B A has nn.Linear's
  init variance 1/(3n); biases keep the model's own init. The paper's LR re-warmup schedulers are not included.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import TRAIN
from ..nn import LowRankLinear
from ._projector import check_positive_int
from ._scheduled import Scheduled
from .sltrain import DEFAULT_TARGETS, SLLinear, SLTrain, check_sparse_lowrank_fields, sltrain_

BASES = ("lowrank", "sltrain")
_FIRST_MOMENTS = ("exp_avg", "momentum_buffer")
_SECOND_MOMENTS = ("exp_avg_sq", "max_exp_avg_sq")


def factors(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(B (out, r), A (r, in)) of a factored layer, or None."""
    if isinstance(layer, LowRankLinear):
        return layer.up.weight, layer.down.weight
    if isinstance(layer, SLLinear):
        return layer.B, layer.A
    return None


@torch.no_grad()
def balanced_factors(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U Σ^½, Σ^½ Vᵀ, Σ)`` with ``B A = U Σ Vᵀ``, from ``B = Q_B R_B``, ``Aᵀ = Q_A R_A`` and the SVD of the
    core ``R_B R_Aᵀ``; in float32 (float64 for float64 factors), never forming the (out, in) product."""
    dtype = torch.float64 if B.dtype == torch.float64 else torch.float32
    Qb, Rb = torch.linalg.qr(B.to(dtype))
    Qa, Ra = torch.linalg.qr(A.to(dtype).T)
    Uc, S, Vch = torch.linalg.svd(Rb @ Ra.T)
    root = S.sqrt()
    return (Qb @ Uc) * root, root[:, None] * (Vch @ Qa.T), S


@torch.no_grad()
def _refactor_layer(layer: nn.Module) -> tuple[Tensor, Tensor] | None:
    pair = factors(layer)
    if pair is None:
        return None
    B, A = pair
    if B.shape[1] > min(B.shape[0], A.shape[1]):
        return None
    B_new, A_new, S = balanced_factors(B, A)
    if not S[0] > 0:  # a zero product has no balanced factorization that can still train
        return None
    B.copy_(B_new.to(B.dtype))  # in place: the optimizer keeps the same Parameters
    A.copy_(A_new.to(A.dtype))
    return pair


def refactor_(model: nn.Module) -> int:
    """Balance every factored layer of ``model`` in place (function unchanged); returns how many were refactored."""
    return sum(_refactor_layer(m) is not None for m in model.modules())


@torch.no_grad()
def reset_moments_(optimizer: torch.optim.Optimizer, params: Iterable[Tensor] | None = None, *,
                   second_moment: bool = True, step_counter: bool = True) -> None:
    """Zero the moments (Adam's exp_avg, and exp_avg_sq / max_exp_avg_sq if ``second_moment``; SGD's momentum) of
    ``params`` (default: every parameter with state) and their step counters if ``step_counter``: with both flags
    the next update is a fresh Adam first step. (Keeping v while resetting the step inflates v̂ by 1/(1−β₂).)"""
    wanted = None if params is None else {id(p) for p in params}
    for p, state in optimizer.state.items():
        if wanted is not None and id(p) not in wanted:
            continue
        for key, value in list(state.items()):
            if key in _FIRST_MOMENTS or (second_moment and key in _SECOND_MOMENTS) or (step_counter and key == "step"):
                if isinstance(value, Tensor):
                    value.zero_()
                else:
                    state[key] = type(value)(0)


def lowrank_(model: nn.Module, *, rank: int, targets: tuple[str, ...], seed: int = 0) -> list[str]:
    """Replace every ``nn.Linear`` whose name contains one of ``targets`` by a freshly initialized
    ``ss.nn.LowRankLinear`` (see the module docstring for the init); returns the replaced names."""
    from ..adapters._core import stable_seed

    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    chosen = [(name, mod) for name, mod in linears if any(t in name for t in targets)]
    if not chosen:
        shown = ", ".join(name for name, _ in linears[:12]) or "none"
        raise SubspacesError(f"Restarts targets={targets!r} match no nn.Linear; the model's linear layers are: {shown}")
    for name, old in chosen:
        g = torch.Generator().manual_seed(stable_seed("restarts", seed, name))
        new = LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None,
                            device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            for w, bound in ((new.down.weight, 1 / math.sqrt(old.in_features)), (new.up.weight, math.sqrt(3 / rank))):
                w.copy_(torch.empty(w.shape).uniform_(-bound, bound, generator=g))
            if old.bias is not None:
                new.up.bias.copy_(old.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
    return [name for name, _ in chosen]


class RestartsOptimizer(Scheduled):
    """Steps ``inner`` (AdamW), then every ``update_every`` steps refactors ``layers`` (and resets their moments)
    and every ``reset_every`` steps resets all moments. ``param_groups`` and ``state`` are ``inner``'s own objects,
    so LR schedulers and the Hugging Face Trainer act on the optimizer that steps."""

    def __init__(self, inner: torch.optim.Optimizer, layers: Iterable[nn.Module], *, update_every: int | None = 200,
                 reset_every: int | None = 200, reset_second_moment: bool = True,
                 reset_step_counter: bool = True) -> None:
        check_period("RestartsOptimizer", "update_every", update_every)
        check_period("RestartsOptimizer", "reset_every", reset_every)
        super().__init__(inner)
        self.layers = [m for m in layers if factors(m) is not None]
        self.update_every, self.reset_every = update_every, reset_every
        self.reset_second_moment, self.reset_step_counter = reset_second_moment, reset_step_counter

    def after_step(self) -> None:
        t, flags = self.steps, dict(second_moment=self.reset_second_moment, step_counter=self.reset_step_counter)
        refactored = []
        if self.update_every is not None and t % self.update_every == 0:
            refactored = [p for layer in self.layers for p in (_refactor_layer(layer) or ())]
        if self.reset_every is not None and t % self.reset_every == 0:
            reset_moments_(self.inner, **flags)
        elif refactored:
            reset_moments_(self.inner, refactored, **flags)


def check_period(method: str, name: str, value: object) -> None:
    if value is not None:
        check_positive_int(method, name, value)


@TRAIN.register("restarts", paper="https://arxiv.org/abs/2505.22922",
                defaults={"pretrain": {"lr": 3e-3}}, status="partial",
                note="no LR re-warmup schedulers (cosine_restarts / quick recovery, optional in the paper)")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Restarts:
    """Low-rank (``base="lowrank"``) or SLTrain (``base="sltrain"``) pretraining with periodic weight
    refactorization (``update_every`` = T_ref) and momentum reset (``reset_every`` = T_reset); None turns one off.
    ``alpha`` and ``density`` are SLTrain's (base "sltrain" only)."""

    base: str = "lowrank"
    rank: int = 128
    alpha: float = 32.0
    density: float = 0.03
    update_every: int | None = 200
    reset_every: int | None = 200
    reset_second_moment: bool = True
    reset_step_counter: bool = True
    targets: tuple[str, ...] = DEFAULT_TARGETS
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.base not in BASES:
            raise SubspacesError(f"Restarts base={self.base!r}: allowed {BASES}")
        check_positive_int("Restarts", "rank", self.rank)
        check_sparse_lowrank_fields("Restarts", self.density, self.alpha, self.targets, self.seed)
        check_period("Restarts", "update_every", self.update_every)
        check_period("Restarts", "reset_every", self.reset_every)
        for name in ("reset_second_moment", "reset_step_counter"):
            if not isinstance(getattr(self, name), bool):
                raise SubspacesError(f"Restarts {name}={getattr(self, name)!r}: must be True or False")

    def setup(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> RestartsOptimizer:
        """Reparameterize ``model`` in place, then return a ``RestartsOptimizer`` around AdamW over all of its
        trainable parameters."""
        if self.base == "sltrain":
            names = sltrain_(model, SLTrain(rank=self.rank, density=self.density, alpha=self.alpha,
                                            targets=self.targets, seed=self.seed))
        else:
            names = lowrank_(model, rank=self.rank, targets=self.targets, seed=self.seed)
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
        return RestartsOptimizer(inner, [model.get_submodule(n) for n in names], update_every=self.update_every,
                                 reset_every=self.reset_every, reset_second_moment=self.reset_second_moment,
                                 reset_step_counter=self.reset_step_counter)
