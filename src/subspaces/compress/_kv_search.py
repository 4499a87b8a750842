"""Rank allocation for MatryoshkaKV (``matryoshka_kv.py``): the rank grid, uniform ranks under a cache budget, and
the greedy search over (layer, KV head, K/V) units. The budget is the average fraction of the KV cache kept."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .._errors import SubspacesError
from ._calibrate import Batch, call
from ._kv_attention import KVProjection, disabled
from ._kv_eval import kl, logits, split


def rank_grid(head_dim: int, step: int | None) -> list[int]:
    """{step, 2·step, …, d_h} (d_h always included); default step d_h/8 (the paper's 16 for d_h = 128)."""
    step = step or max(1, head_dim // 8)
    return sorted({*range(step, head_dim + 1, step), head_dim})


def _units(found: list[KVProjection], step: int | None) -> list[tuple[torch.Tensor, int, list[int]]]:
    """(rank tensor, head, grid) of every (layer, head, K/V), K and V interleaved."""
    return [(r, h, rank_grid(s.head_dim, step)) for s in found for h in range(s.heads) for r in (s.r_k, s.r_v)]


def _total(units) -> int:
    return sum(int(r[h]) for r, h, _ in units)


def _check_budget(units, budget: float) -> float:
    target = budget * sum(g[-1] for _, _, g in units)
    if sum(g[0] for _, _, g in units) > target + 1e-9:
        raise SubspacesError(f"matryoshka_kv budget={budget:.4g} is below the smallest grid rank; lower step")
    return target + 1e-9


@torch.no_grad()
def uniform_ranks(found: list[KVProjection], budget: float, step: int | None) -> None:
    """Every unit at the largest grid rank ≤ budget·d_h, then raised a grid step at a time while the total fits."""
    units = _units(found, step)
    target = _check_budget(units, budget)
    for r, h, g in units:
        r[h] = max([x for x in g if x <= budget * g[-1] + 1e-9] or g[:1])
    raised = True
    while raised:
        raised = False
        for r, h, g in units:
            up = [x for x in g if x > int(r[h])]
            if up and _total(units) + up[0] - int(r[h]) <= target:
                r[h], raised = up[0], True


@torch.no_grad()
def greedy_ranks(model: nn.Module, found: list[KVProjection], budget: float, batches: Sequence[Batch], *,
                 step: int | None, score: str = "kl", per_round: float = 0.25) -> None:
    """From full rank, shrink the units whose one-step shrink costs least (KL to the uncompressed model, or the
    final hidden state's relative change), ``per_round`` of the candidates per round, until the budget is met."""
    units = _units(found, step)
    target = _check_budget(units, budget)
    data = [split(b) for b in batches]
    with disabled(model):
        teacher = [logits(model, inputs) for inputs, _, _ in data]

    def hidden() -> list[torch.Tensor]:
        return [call(model, x, use_cache=False, output_hidden_states=True).hidden_states[-1].float()
                for x, _, _ in data]

    def cost(ref: list[torch.Tensor] | None) -> float:
        if ref is None:
            return sum(float(kl(t, logits(model, x), m)) for t, (x, _, m) in zip(teacher, data))
        return sum(float((h - r).norm() / r.norm().clamp_min(1e-30)) for h, r in zip(hidden(), ref))

    was_training = model.training
    model.eval()
    try:
        while _total(units) > target:
            cands = [u for u in units if int(u[0][u[1]]) > u[2][0]]
            ref = hidden() if score == "hidden" else None
            scores = []
            for r, h, g in cands:
                old = int(r[h])
                r[h] = max(x for x in g if x < old)
                scores.append(cost(ref))
                r[h] = old
            cheapest = sorted(range(len(cands)), key=scores.__getitem__)
            for j in cheapest[: max(1, math.ceil(per_round * len(cands)))]:
                if _total(units) <= target:
                    break
                r, h, g = cands[j]
                r[h] = max(x for x in g if x < int(r[h]))
    finally:
        model.train(was_training)
