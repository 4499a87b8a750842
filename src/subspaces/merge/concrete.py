"""Concrete subspace learning: one Concrete (Gumbel-sigmoid) mask shared by all task vectors, learned by test-time
entropy minimization, then Task Arithmetic or AdaMerging on the masked task vectors.

Tang, Shen, Luo, Ding, Hu, Du, Tao, "Concrete Subspace Learning based Interference Elimination for Multi-task Model
Fusion", arXiv 2023, https://arxiv.org/abs/2312.06173. Official code (the authors' FusionBench):
https://github.com/tanganke/fusion_bench -- fusion_bench/method/concrete_subspace/clip_concrete_task_arithmetic.py,
clip_concrete_adamerging.py, fusion_bench/models/masks/mask_model.py, config/method/concrete_subspace/*.yaml.

Rule: m̂ = σ((log u − log(1−u) + x) / λ), u ~ U(0,1) per entry, m = m̂ / mean(m̂) per tensor; θ(m) = θ0 + Σ_t w_t
(m ⊙ τ_t); min_x Σ_t H(softmax(f_t(X_t; θ(m)))) over unlabelled test batches, Adam (lr 1e-3) on the mask logits x
(init 0, λ = 0.5). inner="task_arithmetic" (default): w_t = 0.3 fixed, 2000 steps. inner="adamerging": each step (inner)
w is reset to 0.3 and takes one Adam step (lr 1) on the entropy with m̂ detached, then (outer) x takes one step with
that w fixed, 1000 steps; the final mask is then frozen and AdaMerging (task- or layer-wise, unclamped) learns w for
1000 more steps (lr 1e-3). The final mask is one more sample ("continuous", default) or its binarization at 0.5
("discrete", which is a Bernoulli(σ(x)) sample, as FusionBench's), rescaled the same way.

Deviations: the model runs in eval mode (no dropout); the mask covers every floating-point parameter (FusionBench:
those with requires_grad); mask logits are float32 whatever the model's dtype; the rescale divides by max(mean, tiny),
so an all-zero discrete mask gives zeros, not NaN; the Gumbel noise comes from ``seed``. Task Arithmetic merges
θ0 + λ m ⊙ Σ_t τ_t (the same thing, with one summed task vector in memory).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import MERGE
from ._learned import (LearnedMerge, adam_step, entropy_grads, learning, merge_params, merged_state_dict,
                       minimize_entropy, prepare, run_learned, steps)
from .adamerging import applied, check, fit_coefficients, init_coefficients

__all__ = ["Concrete", "concrete", "sample_mask", "rescale"]
PAPER = "https://arxiv.org/abs/2312.06173"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Concrete:
    """Hyperparameters (FusionBench's configs); ``steps`` None = 2000 (task arithmetic) or 1000 (adamerging)."""
    inner: str = "task_arithmetic"  # or "adamerging"
    granularity: str = "layer"  # AdaMerging's coefficients: "task" or "layer"
    scaling: float = 0.3  # Task Arithmetic's λ; AdaMerging's initial coefficient
    temperature: float = 0.5
    initial_logits: float = 0.0
    lr: float = 1e-3  # mask logits
    steps: int | None = None  # mask-learning steps
    base_lr: float = 1.0  # inner AdaMerging step while the mask is learned
    adamerging_steps: int = 1000
    adamerging_lr: float = 1e-3
    clamp: tuple[float, float] | None = None
    eval_mask: str = "continuous"  # or "discrete"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.inner not in ("task_arithmetic", "adamerging"):
            raise SubspacesError(f"concrete: inner={self.inner!r}; allowed: 'task_arithmetic', 'adamerging'")
        if self.eval_mask not in ("continuous", "discrete"):
            raise SubspacesError(f"concrete: eval_mask={self.eval_mask!r}; allowed: 'continuous', 'discrete'")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise SubspacesError(f"concrete: temperature={self.temperature!r}; allowed: a number > 0")
        check(self, "concrete")
        if self.steps is None:
            object.__setattr__(self, "steps", 2000 if self.inner == "task_arithmetic" else 1000)


def sample_mask(logits: Mapping[str, torch.Tensor], temperature: float, generator: torch.Generator | None = None,
                *, hard: bool = False) -> dict[str, torch.Tensor]:
    """Binary Concrete sample σ((log u − log(1−u) + x)/λ) per entry, differentiable in x; ``hard``: the sample
    binarized at 0.5, i.e. a Bernoulli(σ(x)) sample."""
    out = {}
    for k, x in logits.items():
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        u = u.clamp_min(torch.finfo(x.dtype).tiny)  # log 0
        m = torch.sigmoid((u.log() - torch.log1p(-u) + x) / temperature)
        out[k] = (m > 0.5).to(m.dtype) if hard else m
    return out


def rescale(mask: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """m / mean(m) per tensor: the expected size of the masked update is kept."""
    return {k: m / m.mean().clamp_min(torch.finfo(m.dtype).tiny) for k, m in mask.items()}


def _bilevel(model: nn.Module, base: dict, tvs: Sequence[dict], x: dict, sample, job, cfg: Concrete,
             progress: bool) -> list[float]:
    """Mask learning with AdaMerging as the lower level (one inner step from the initial w per outer step)."""
    device = next(iter(x.values())).device
    w0 = init_coefficients(len(tvs), len(tvs[0]), cfg.granularity, cfg.scaling, device)
    w, leaves = w0.clone().requires_grad_(), list(x.values())
    inner_opt, outer_opt = torch.optim.Adam([w], lr=cfg.base_lr), torch.optim.Adam(leaves, lr=cfg.lr)
    losses = []
    with learning(model):
        for _ in steps(cfg.steps, progress, "Concrete mask (AdaMerging)"):
            m = sample()
            with torch.no_grad():
                w.copy_(w0)  # the lower level restarts from the initial coefficients every step (official)
            fixed = {k: v.detach() for k, v in m.items()}
            _, g = entropy_grads(model, merge_params(base, tvs, applied(w, cfg.clamp), mask=fixed), [w],
                                 job.batches, job.fns)
            adam_step(inner_opt, [w], g)
            loss, g = entropy_grads(model, merge_params(base, tvs, applied(w, cfg.clamp).detach(), mask=m), leaves,
                                    job.batches, job.fns)
            adam_step(outer_opt, leaves, g)
            losses.append(loss)
    return losses


def concrete(model: nn.Module, models: Sequence[Any] | Mapping[str, Any], data: Sequence[Any] | None = None, *,
             logits: Any = None, progress: bool = False, **hp: Any) -> LearnedMerge:
    """Concrete Task Arithmetic / Concrete AdaMerging of ``models`` into ``model`` (θ0, run as is).

    ``data``, ``logits``: as :func:`subspaces.merge.adamerging.adamerging` (one iterable of unlabelled batches and
    one logits callable per model). Hyperparameters: the fields of :class:`Concrete`. Returns the merged state dict
    (``model`` is not modified), the coefficients, the loss per step and the final mask (rescaled)."""
    job = prepare("concrete", Concrete, model, models, data, logits, hp)
    cfg, tvs = job.config, job.tvs
    base = {k: p.detach() for k, p in model.named_parameters()}
    device = next(iter(tvs[0].values())).device
    x = {k: torch.full(v.shape, float(cfg.initial_logits), device=v.device, requires_grad=True)
         for k, v in tvs[0].items()}
    gen = torch.Generator(device).manual_seed(int(cfg.seed))

    def sample(hard: bool = False) -> dict[str, torch.Tensor]:
        return rescale(sample_mask(x, cfg.temperature, gen, hard=hard))

    hard = cfg.eval_mask == "discrete"
    if cfg.inner == "task_arithmetic":
        summed = [{k: sum(tv[k].float() for tv in tvs) for k in tvs[0]}]  # one λ for all: θ0 + λ m ⊙ Σ τ
        lam = torch.full((1,), float(cfg.scaling), device=device)
        losses = minimize_entropy(model, lambda: merge_params(base, summed, lam, mask=sample()), list(x.values()),
                                  job.batches, job.fns, n_steps=cfg.steps, lr=cfg.lr, progress=progress,
                                  desc="Concrete mask")
        with torch.no_grad():
            mask = sample(hard)
            params = merge_params(base, summed, lam, mask=mask)
        coef = torch.full((len(tvs),), float(cfg.scaling), device=device)
    else:
        losses = _bilevel(model, base, tvs, x, sample, job, cfg, progress)
        with torch.no_grad():
            mask = sample(hard)
        coef, more = fit_coefficients(model, tvs, job.batches, job.fns, granularity=cfg.granularity,
                                      init=cfg.scaling, clamp=cfg.clamp, steps=cfg.adamerging_steps,
                                      lr=cfg.adamerging_lr, mask=mask, progress=progress)
        losses += more
        with torch.no_grad():
            params = merge_params(base, tvs, coef, mask=mask)
    return LearnedMerge(merged_state_dict(model, params), coef, losses, mask)


MERGE.register("concrete", paper=PAPER, status="complete")(concrete)
concrete.kind = "learned"
concrete.config = Concrete  # its hyperparameters
concrete.run = functools.partial(run_learned, "concrete", concrete)
