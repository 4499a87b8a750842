"""WeLore: From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients
(Jaiswal, Yin, Zhang, Liu, Zhao, Tian, Wang, 2024). https://arxiv.org/abs/2407.11239 —
official code https://github.com/VITA-Group/WeLore (``utils.py::adaptive_rank_pruning``,
``lib/rank_reduction.py``, ``lib/LowRankLayer.py``).

Rule: σ̂ = (σ − σ_min)/(σ_max − σ_min) per matrix; p(W) = #{σ̂ < τ}, with one global τ such that
Σp/Σd ≈ ρ; k = d − p; W is an LRC iff p/d > min_ratio and becomes ``up(down(x))`` with
``up = U_k S_k^½``, ``down = S_k^½ V_kᵀ``; only LRC factors train (N-LRCs and everything else frozen).

Deviations from the reference code, all deliberate:
- τ is found by binary search over the sorted normalized singular values (exact: the attainable Σp closest to
  ρ·Σd) instead of the hand-tuned ρ → τ table for LLaMA-2, so any model and any ρ work.
- k is clamped to ≥ 1 (τ > 1 would prune a whole matrix); a flat spectrum (σ_max = σ_min) is never pruned
  (the reference divides 0 by 0 and, through NaN comparisons, prunes nothing either).
- Factors keep the layer's dtype and device (the reference casts them to bf16); the SVD runs in float32/float64.
- A layer bias (absent in LLaMA; the reference drops it) is kept in ``up`` and stays frozen.
- Targets go beyond LLaMA's ``self_attn``/``mlp`` (see ``DEFAULT_TARGETS``); GPT-2 ``Conv1D`` is not converted.
As in the paper, an LRC is factorized whenever p/d > min_ratio, even where k(m+n) > mn (more parameters than dense).
A checkpoint of the converted model has ``<name>.down.weight`` / ``.up.weight`` keys: rerun ``welore_`` on the
pretrained model (same ranks) before loading it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import TRAIN
from .._targets import select
from ..measure.spectra import spectrum
from ..nn import LowRankLinear

# With a sequence of names, a Linear is targeted when it sits in a numbered block (``layers.3``, ``layer.3``) and a
# component of its name after the block index equals a target or ends with ``_<target>``:
# LLaMA/Mistral ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``; BERT/ViT ``attention.self.{query,key,
# value}``, ``attention.output.dense``, ``intermediate.dense``, ``output.dense``. Heads, poolers and MLM transforms
# (outside the blocks) are never matched. A regex string or "all-linear" uses ``_targets.select`` instead.
DEFAULT_TARGETS = ("attn", "mlp", "attention", "query", "key", "value", "dense")


def _normalized(S: Tensor) -> Tensor:
    S = S.detach().to(torch.float64).flatten()
    lo, hi = S.min(), S.max()
    if hi == lo:  # flat spectrum: no tail to prune
        return torch.ones_like(S)
    return (S - lo) / (hi - lo)


def _count(normed: Tensor, tau: float) -> int:
    return min(int((normed < tau).sum()), normed.numel() - 1)  # k = d − p ≥ 1 even for τ > 1


def pruned_count(S: Tensor, tau: float) -> int:
    """p = #{σ̂ < τ} for singular values ``S``, capped at d − 1 so that at least one direction is kept."""
    return _count(_normalized(S), tau)


def _check_ratios(reduction: Any, min_ratio: Any) -> None:
    for field, v in (("reduction", reduction), ("min_ratio", min_ratio)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
            raise SubspacesError(f"WeLore {field}={v!r}: must be a number in [0, 1)")


def welore_ranks(spectra: Mapping[str, Tensor], reduction: float, *, min_ratio: float = 0.0
                 ) -> tuple[float, dict[str, int], dict[str, bool]]:
    """WeLore rank allocation: (τ, name → kept rank k, name → is LRC) for singular values per matrix.

    τ is the threshold whose global pruned fraction Σp/Σd is closest to ``reduction`` (within one singular value
    where normalized values are distinct; every σ_min normalizes to 0, so the first step prunes one per matrix).
    """
    _check_ratios(reduction, min_ratio)
    if not spectra:
        raise SubspacesError("welore_ranks: no spectra given")
    for name, S in spectra.items():
        if not isinstance(S, Tensor) or S.ndim != 1 or S.numel() == 0 or not torch.isfinite(S).all() or (S < 0).any():
            raise SubspacesError(f"welore_ranks: spectrum {name!r} must be a non-empty 1-D tensor of finite values >= 0")
    normed = {n: _normalized(S) for n, S in spectra.items()}
    values = torch.sort(torch.cat([v.cpu() for v in normed.values()])).values
    total = values.numel()
    # Σp(τ) only changes at the distinct normalized values c, where it equals #{σ̂ < c}; the values 1 (every σ_max)
    # are never pruned for τ ≤ 1, which keeps k ≥ 1 without clamping.
    cands = torch.unique(values)
    counts = torch.searchsorted(values, cands, right=False).to(torch.float64)
    target = reduction * total
    i = int(torch.searchsorted(counts, torch.tensor([target], dtype=torch.float64))[0])
    i = min(i, len(cands) - 1)
    if i > 0 and target - counts[i - 1] <= counts[i] - target:
        i -= 1  # a tie goes to the smaller reduction
    tau = float(cands[i])
    ranks, lrc = {}, {}
    for name, v in normed.items():
        p = _count(v, tau)
        ranks[name] = v.numel() - p
        lrc[name] = p / v.numel() > min_ratio
    return tau, ranks, lrc


def _in_block_match(name: str, targets: Sequence[str]) -> bool:
    parts = name.split(".")
    blocks = [i for i, part in enumerate(parts) if part.isdigit()]
    if not blocks:
        return False
    return any(part == t or part.endswith("_" + t) for part in parts[blocks[0] + 1:] for t in targets)


def _targeted(model: nn.Module, targets: str | Sequence[str]) -> list[tuple[str, nn.Linear]]:
    inside_lrc = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for c in ("down", "up")}
    if isinstance(targets, str):
        chosen = select(model, targets)
    else:
        chosen = [(n, m) for n, m in model.named_modules() if _in_block_match(n, targets)]
    found = [(n, m) for n, m in chosen if type(m) is nn.Linear and n not in inside_lrc]
    if not found:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise SubspacesError(f"WeLore targets={targets!r} match no nn.Linear; Linear names look like: {names}")
    return found


def welore_(model: nn.Module, *, reduction: float = 0.5, min_ratio: float = 0.0,
            targets: str | Sequence[str] = DEFAULT_TARGETS) -> dict[str, Any]:
    """Replace the targeted Linears that WeLore finds compressible (LRCs) by ``LowRankLinear`` of their allocated
    rank, keep the others dense, and freeze every parameter except the LRC factors (``down.weight``, ``up.weight``;
    an LRC bias stays frozen). Returns ``{"tau", "reduction" (achieved Σp/Σd), "layers": [{name, shape (out, in),
    d, rank, lrc, params_before, params_after}]}``."""
    _check_ratios(reduction, min_ratio)
    layers = _targeted(model, targets)
    with torch.no_grad():
        spectra = {n: spectrum(m.weight).cpu() for n, m in layers}
    tau, ranks, lrc = welore_ranks(spectra, reduction, min_ratio=min_ratio)
    rows, pruned, total = [], 0, 0
    for name, layer in layers:
        out_f, in_f = layer.weight.shape
        d, k = min(out_f, in_f), ranks[name]
        before = sum(p.numel() for p in layer.parameters())
        if lrc[name]:
            new = LowRankLinear.from_linear(layer, k)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, new)
            pruned += d - k
        else:
            k = d
        total += d
        after = before if not lrc[name] else k * (out_f + in_f) + (0 if layer.bias is None else out_f)
        rows.append({"name": name, "shape": (out_f, in_f), "d": d, "rank": k, "lrc": lrc[name],
                     "params_before": before, "params_after": after})
    model.requires_grad_(False)
    for row in rows:
        if row["lrc"]:
            lr_layer = model.get_submodule(row["name"])
            lr_layer.down.weight.requires_grad_(True)
            lr_layer.up.weight.requires_grad_(True)
    return {"tau": tau, "reduction": pruned / total, "layers": rows}


@TRAIN.register("welore", paper="https://arxiv.org/abs/2407.11239")
@dataclasses.dataclass(frozen=True, kw_only=True)
class WeLore:
    """WeLore: non-uniform low-rank conversion, then Adam on the LRC factors only. ``reduction`` is the target
    fraction ρ of singular directions pruned over all targeted matrices; a matrix is an LRC iff its own pruned
    fraction exceeds ``min_ratio`` (paper: 0, selective variant 0.4). ``targets``: see ``DEFAULT_TARGETS``."""

    reduction: float = 0.5
    min_ratio: float = 0.0
    targets: str | tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        _check_ratios(self.reduction, self.min_ratio)
        t = self.targets
        if not isinstance(t, str):
            if not (isinstance(t, Sequence) and t and all(isinstance(s, str) and s for s in t)):
                raise SubspacesError(f"WeLore targets={t!r}: a regex string, 'all-linear' or a non-empty list of names")
            object.__setattr__(self, "targets", tuple(t))

    def setup(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """Convert ``model`` in place (``welore_``) and return AdamW over the LRC factors; the report is kept as
        ``optimizer.report``."""
        report = welore_(model, reduction=self.reduction, min_ratio=self.min_ratio, targets=self.targets)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise SubspacesError(f"WeLore reduction={self.reduction}, min_ratio={self.min_ratio} left every matrix "
                                 "dense (no LRC), so nothing is trainable; raise reduction or lower min_ratio")
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        opt.report = report
        return opt
