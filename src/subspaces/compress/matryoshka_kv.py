"""MatryoshkaKV: trainable orthogonal projections that compress the KV cache along the head dimension.

Lin, Zeng, Xiao, Kou, Hou, Gao, Zhang, Deng, "MatryoshkaKV: Adaptive KV Compression via Trainable Orthogonal
Projection", ICLR 2025, https://arxiv.org/abs/2410.14731 — code: https://github.com/The-kamisato/MatryoshkaKV-cache

Rule, per layer and KV head (keys after RoPE): the cache holds k' = (k − μ_K)U_K[:, :r_k] and
v' = (v − μ_V)U_V[:, :r_v]; o = softmax(q U_K[:, :r_k] k'ᵀ/√d_h) v' U_V[:, :r_v]ᵀ + μ_V, U = Cayley(X) ∈ SO(d_h)
(mechanism: ``_kv_attention``; ranks: ``_kv_search``).

``compress_model``: (1) PCA init on the calibration batches: per (layer, KV head) float64 mean and covariance of
post-RoPE keys and of values → eigenvectors (descending, det +1), means; X = Cayley⁻¹(U). (2) Optional Matryoshka
distillation (``train_steps``): base frozen; X_K, X_V, μ_K, μ_V trained with AdamW (lr 1e-3, clip 1.0, warmup then
cosine); every step each (layer, head, K/V) draws its rank uniformly from {step, 2·step, …, d_h}; loss
0.25·KL(teacher ‖ student) + 0.75·CE, teacher = the model without projections. (3) Ranks under ``budget`` (average
kept fraction of the cache): ``search="greedy"`` starts at full rank and, in rounds, scores every unit's one-step
shrink on ``search_batches`` batches and shrinks the cheapest ones until the budget is met; ``"uniform"`` gives every
unit the same grid rank (as close to the budget as the grid allows, never above it).

Deviations: calibration is teacher-forced only (the paper also generates 50 tokens per prompt to include decode-time
keys); training cycles over the calibration batches (paper: 1 epoch of RedPajama), warmup is min(warmup, steps/10),
X gets no weight decay; the greedy search shrinks a fraction ``per_round`` of the candidates per round (the official
script shrinks a fixed count per round and scores by the final hidden state's relative error, ``score="hidden"``;
the default ``score="kl"`` is the paper's validation KL); U is not folded into W_v / W_o; PCA column signs are chosen
to keep U near I (every sign choice is a PCA basis) before the det +1 flip; the LoRA option is not offered.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import COMPRESS
from .._targets import Selector, select
from ._calibrate import Batch, call, check_batches
from ._kv_attention import KVProjection, attach, attention_modules, disabled, inverse_cayley, pca_basis, states
from ._kv_eval import attention_errors, cache_bytes_per_token, cross_entropy, kl, logits, perplexity, split
from ._kv_search import greedy_ranks, rank_grid, uniform_ranks

SEARCHES, SCORES = ("greedy", "uniform"), ("kl", "hidden")


@COMPRESS.register("matryoshka_kv", paper="https://arxiv.org/abs/2410.14731", status="complete",
                   note="KV-cache (head-dimension) compression of LLaMA-family attention; PCA init, optional "
                        "distillation, greedy/uniform rate search; calibration without generated tokens")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MatryoshkaKV:
    """``budget``: average fraction of the KV cache kept (``ratio`` = fraction removed overrides it); ``step``: the
    rank grid step (default d_h/8); ``train_steps``: distillation steps (0: PCA projections only)."""

    budget: float = 0.5
    step: int | None = None
    train_steps: int = 0
    search: str = "greedy"
    score: str = "kl"
    search_batches: int = 1
    per_round: float = 0.25
    lr: float = 1e-3
    kl_weight: float = 0.25
    ce_weight: float = 0.75
    warmup: int = 100
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, ok, allowed in (
            ("budget", 0 < self.budget <= 1, "a fraction in (0, 1]"),
            ("step", self.step is None or (isinstance(self.step, int) and self.step >= 1), "None or an int >= 1"),
            ("train_steps", isinstance(self.train_steps, int) and self.train_steps >= 0, "an int >= 0"),
            ("search", self.search in SEARCHES, ", ".join(SEARCHES)),
            ("score", self.score in SCORES, ", ".join(SCORES)),
            ("search_batches", isinstance(self.search_batches, int) and self.search_batches >= 1, "an int >= 1"),
            ("per_round", 0 < self.per_round <= 1, "a fraction in (0, 1]"),
            ("lr", self.lr > 0, "> 0"),
            ("kl_weight", self.kl_weight >= 0 and self.kl_weight + self.ce_weight > 0, ">= 0, kl+ce weight > 0"),
            ("ce_weight", self.ce_weight >= 0, ">= 0"),
            ("warmup", isinstance(self.warmup, int) and self.warmup >= 0, "an int >= 0"),
            ("max_grad_norm", self.max_grad_norm > 0, "> 0"),
        ):
            if not ok:
                raise SubspacesError(f"MatryoshkaKV {name}={getattr(self, name)!r}; allowed: {allowed}")

    def compress_model(self, model: nn.Module, *, calibration: Iterable[Batch] | None, ratio: float | None = None,
                       rank: int | None = None, energy: float | None = None, targets: Selector = "all-linear",
                       exclude: Selector | None = None, **_: Any) -> dict[str, Any]:
        """Attach, PCA-init, train (optional) and rank the projections of the selected attention modules in place.
        ``rank``: the same rank for every unit; ``energy``: per unit the smallest grid rank keeping that fraction of
        its PCA eigenvalue sum; otherwise ``search`` under the budget."""
        batches = check_batches(calibration)
        if batches is None:
            raise SubspacesError("matryoshka_kv needs calibration batches (PCA of keys/values): pass calibration=[...]")
        for name, value, ok, allowed in (
            ("ratio", ratio, ratio is None or 0 <= ratio < 1, "the fraction of the KV cache removed, in [0, 1)"),
            ("rank", rank, rank is None or (isinstance(rank, int) and rank >= 1), "an int >= 1 (every head)"),
            ("energy", energy, energy is None or 0 < energy <= 1, "a fraction in (0, 1]"),
        ):
            if not ok:
                raise SubspacesError(f"matryoshka_kv {name}={value!r}; allowed: {allowed}")
        budget = self.budget if ratio is None else 1.0 - ratio
        modules = _select(model, targets, exclude)
        found = calibrate_(model, modules, batches)
        losses = train_(model, batches, self) if self.train_steps else []
        if rank is not None:
            for s in found:
                s.r_k.fill_(min(rank, s.head_dim))
                s.r_v.fill_(min(rank, s.head_dim))
        elif energy is not None:
            for s in found:
                g = torch.tensor(rank_grid(s.head_dim, self.step), device=s.r_k.device)
                for r, lam in ((s.r_k, s.stats["lam_k"]), (s.r_v, s.stats["lam_v"])):
                    cum = (lam.cumsum(-1) / lam.sum(-1, keepdim=True).clamp_min(1e-300)).to(r.device)
                    need = (cum < energy - 1e-12).sum(-1) + 1  # smallest r with Σ_{i<r} λ_i ≥ energy·Σλ
                    r.copy_(g[torch.searchsorted(g, need).clamp_max(len(g) - 1)])
        elif self.search == "uniform":
            uniform_ranks(found, budget, self.step)
        else:
            greedy_ranks(model, found, budget, batches[: self.search_batches], step=self.step, score=self.score,
                         per_round=self.per_round)
        per, total = attention_errors(model, batches)
        kept, full = cache_bytes_per_token(model)
        dims = sum(s.heads * s.head_dim for s in found)  # per K (and per V)
        return {
            "method": "matryoshka_kv", "search": self.search if rank is None and energy is None else None,
            "target_budget": budget, "target_ratio": 1.0 - budget, "grid": rank_grid(found[0].head_dim, self.step),
            "cache_bytes_per_token": kept, "cache_bytes_per_token_baseline": full,
            "kept": kept / full, "ratio": 1.0 - kept / full,
            "key_fraction": sum(int(s.r_k.sum()) for s in found) / dims,
            "value_fraction": sum(int(s.r_v.sum()) for s in found) / dims,
            "attention_error": total, "train_losses": losses,
            "params_added": sum(p.numel() for s in found for p in s.parameters()),
            "layers": [{"name": n, "r_k": s.r_k.tolist(), "r_v": s.r_v.tolist(), "attention_error": e}
                       for n, s, e in zip(modules, found, per)],
        }


def _select(model: nn.Module, targets: Selector, exclude: Selector | None) -> dict[str, nn.Module]:
    found = attention_modules(model)
    names = {n for n, _ in select(model, ".*" if targets == "all-linear" else targets, exclude)}
    chosen = {n: m for n, m in found.items() if n in names}
    if not chosen:
        raise SubspacesError(f"targets={targets!r} exclude={exclude!r} select no attention module with q/k/v/o_proj "
                             f"and head_dim (found: {', '.join(found) or 'none'})")
    return chosen


@torch.no_grad()
def calibrate_(model: nn.Module, modules: dict[str, nn.Module], batches: Sequence[Batch]) -> list[KVProjection]:
    """Attach the projections and set them to the PCA of the uncompressed model's post-RoPE keys and values."""
    found = attach(modules)
    was_training = model.training
    model.eval()
    for s in found:
        s.stats, s.recording = {}, True
    try:
        with disabled(model):
            for batch in batches:
                call(model, split(batch)[0], use_cache=False)
    finally:
        for s in found:
            s.recording = False
        model.train(was_training)
    for s in found:
        for name, X, mu in (("k", s.xk, s.mu_k), ("v", s.xv, s.mu_v)):
            mean, cov = s.moments(name)
            U, lam = pca_basis(cov)
            X.copy_(inverse_cayley(U).to(X))
            mu.copy_(mean.to(mu))
            s.stats[f"lam_{name}"] = lam
        for key in [k for k in s.stats if not k.startswith("lam_")]:
            del s.stats[key]
        s.r_k.fill_(s.head_dim)
        s.r_v.fill_(s.head_dim)
    return found


def train_(model: nn.Module, batches: Sequence[Batch], config: MatryoshkaKV) -> list[float]:
    """Matryoshka distillation of the projections (base frozen, ranks resampled every step); the loss per step."""
    found = states(model)
    params = [p for s in found for p in s.parameters()]
    flags = {p: p.requires_grad for p in model.parameters()}
    grids = [torch.tensor(rank_grid(s.head_dim, config.step)) for s in found]
    gen = torch.Generator().manual_seed(config.seed)
    steps, warm = config.train_steps, min(config.warmup, config.train_steps // 10)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: (i + 1) / (warm + 1) if i < warm else
                                              0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, steps - warm))))
    losses: list[float] = []
    was_training = model.training
    model.eval()  # dropout off: the student must match the teacher's function
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for i in range(steps):
            inputs, labels, mask = split(batches[i % len(batches)])
            with torch.no_grad(), disabled(model):
                teacher = logits(model, inputs)
            for s, g in zip(found, grids):
                s.r_k.copy_(g[torch.randint(len(g), (s.heads,), generator=gen)])
                s.r_v.copy_(g[torch.randint(len(g), (s.heads,), generator=gen)])
            student = logits(model, inputs)
            loss = config.kl_weight * kl(teacher, student, mask) + config.ce_weight * cross_entropy(student, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        for s in found:
            s.r_k.fill_(s.head_dim)
            s.r_v.fill_(s.head_dim)
        model.train(was_training)
    return losses


def kv_rate_curve(model: nn.Module, batches: Iterable[Batch], rates: Iterable[float], *, step: int | None = 1,
                  eval_batches: Iterable[Batch] | None = None) -> list[dict[str, Any]]:
    """Attention-output relative error and perplexity against the fraction of the KV cache removed (uniform ranks
    on a ``step`` grid; step 1: r = ⌊(1 − rate)·d_h⌋ exactly). Uses the model's projections if it already has them,
    else attaches PCA projections from ``batches``; the ranks are restored afterwards. Rows: ``ratio`` (asked),
    ``kept`` (actual cache fraction), mean ``r_k``/``r_v``, ``attention_error``, ``perplexity``, ``perplexity_base``."""
    batches = check_batches(batches)
    evals = check_batches(eval_batches) or batches
    found = states(model) or calibrate_(model, _select(model, "all-linear", None), batches)
    saved = [(s.r_k.clone(), s.r_v.clone()) for s in found]
    with disabled(model):
        base = perplexity(model, evals)
    rows = []
    try:
        for rate in rates:
            if not 0 <= rate < 1:
                raise SubspacesError(f"kv_rate_curve rate={rate!r}; allowed: the fraction removed, [0, 1)")
            uniform_ranks(found, 1.0 - rate, step)
            _, err = attention_errors(model, evals)
            kept, full = cache_bytes_per_token(model)
            heads = sum(s.heads for s in found)
            rows.append({"ratio": rate, "kept": kept / full, "attention_error": err,
                         "r_k": sum(int(s.r_k.sum()) for s in found) / heads,
                         "r_v": sum(int(s.r_v.sum()) for s in found) / heads,
                         "perplexity": perplexity(model, evals), "perplexity_base": base})
    finally:
        with torch.no_grad():
            for s, (rk, rv) in zip(found, saved):
                s.r_k.copy_(rk)
                s.r_v.copy_(rv)
    return rows
