"""Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning (Nayak et al., 2025).

https://arxiv.org/abs/2504.07097 — official code (``svd/projected_gradient_descent.py``):
https://github.com/Red-Hat-AI-Innovation-Team/orthogonal-subspace-learning (productized as OSFT in mini_trainer).

Update (W (m, n); U_h (m, k), V_h (n, k) top-k singular vectors of W at the task boundary, k = ⌊r · min(m, n)⌋):
``G ← G − U_h U_hᵀ G V_h V_hᵀ``, AdamW on the projected G; after each task U_h, V_h are recomputed
(``next_task_``).
``layer_retention``: I = mean cosine of a block's input and output hidden states on previous-task samples (per
token, padding masked), min–max normalized over blocks (0.5 if all equal), r = mrr + I (trr − mrr) for its Linears.

Deviations and options: ``projection`` also offers "left" ((I − U_hU_hᵀ)G), "right" (G(I − V_hV_hᵀ)) and
"two_sided". ``project_update=True`` (default) also projects the inner optimizer's update: Adam's element-wise
m/(√v+ε) of a projected gradient generally leaves the allowed subspace, so only then does U_hᵀ(W_t − W_0)V_h = 0
hold exactly with Adam (with SGD it holds either way). Decoupled weight decay acts on the full W, so with
weight_decay > 0 the protected singular values shrink by (1 − ηλ) per step, as under the paper's AdamW. The released
code's factor form (W = U_hΣ_hV_hᵀ + U_lΣ_lV_lᵀ, trainable U_l, Σ_l, V_l) is left out. The bases come from the
weight, not the gradient: they are set in ``init_state``, ``rank``/``update_every`` are unused and ``due`` is
always False. A parameter's state is {"U", "V", "step", "seed"}, plain tensors (``weights_only=True`` loads).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import TRAIN
from ._projected import Projected
from ._projector import Projector, State, target_linear_weights

PROJECTIONS = ("block", "left", "right", "two_sided")


@TRAIN.register("sculpt", paper="https://arxiv.org/abs/2504.07097", status="partial",
                note="the released code's factor form (trainable U_low, S_low, V_low) is left out")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Sculpt(Projector):
    """Protect the top singular subspace of each weight (out, in) and train in its complement. ``retention``: the
    fraction r of min(m, n) directions protected, or {parameter name: r} (``layer_retention``), with which ``setup``
    projects exactly the named weights (``targets`` ignored). ``projection``: "block" (paper), "left", "right",
    "two_sided". ``project_update``: also project the inner optimizer's update (exact constraint with Adam)."""

    low_rank = False
    retention: float | Mapping[str, float] = 0.5
    projection: str = "block"
    project_update: bool = True
    targets: tuple[str, ...] = ("attn", "mlp", "attention", "intermediate", "output")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.retention, Mapping):  # stored as sorted pairs: hashable, comparable
            object.__setattr__(self, "retention", tuple(sorted(self.retention.items())))
        for name, r in (self.retention if isinstance(self.retention, tuple) else [("retention", self.retention)]):
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r <= 1:
                raise SubspacesError(f"Sculpt retention {name}={r!r}: must be a number in [0, 1]")
        if self.projection not in PROJECTIONS:
            raise SubspacesError(f"Sculpt projection={self.projection!r}: allowed {PROJECTIONS}")

    def proxy_shape(self, shape: torch.Size) -> tuple[int, int]:  # full shape: the moments are W-sized
        return tuple(shape)

    def protected(self, shape: torch.Size) -> int:
        """k = ⌊r · min(m, n)⌋ (a tiny epsilon keeps e.g. 0.29 · 100 from flooring to 28)."""
        if not isinstance(self.retention, (int, float)):
            raise SubspacesError("Sculpt retention={name: r} is for setup(); in Projected use Sculpt(retention=0.5)")
        return min(math.floor(self.retention * min(shape) + 1e-9), min(shape))

    def init_state(self, param: Tensor, seed: int) -> State:
        """The protected bases U_h (m, k), V_h (n, k) from the SVD of the current weight (float32 or wider)."""
        k, W = self.protected(param.shape), param.detach().to(torch.promote_types(param.dtype, torch.float32))
        if not torch.isfinite(W).all():
            raise SubspacesError(f"Sculpt: a {tuple(param.shape)} weight has non-finite values (no SVD)")
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        return {**super().init_state(param, seed), "U": U[:, :k].to(param.dtype).contiguous(),
                "V": Vh[:k].T.to(param.dtype).contiguous()}

    def due(self, step: int) -> bool:  # the bases come from the weight (init_state / next_task_), not a gradient
        return False

    def project(self, state: State, G: Tensor) -> Tensor:
        """G with the protected part removed (``projection`` rule), computed in at least float32."""
        work = torch.promote_types(G.dtype, torch.float32)
        G, U, V = G.to(work), state["U"].to(work), state["V"].to(work)
        if self.projection == "block":
            return G - U @ ((U.T @ G @ V) @ V.T)
        if self.projection in ("left", "two_sided"):
            G = G - U @ (U.T @ G)
        return G if self.projection == "left" else G - (G @ V) @ V.T

    def down(self, state: State, grad: Tensor) -> Tensor:
        return self.project(state, grad).to(grad.dtype)

    def up(self, state: State, low: Tensor, shape: torch.Size) -> Tensor:
        full = self.project(state, low).to(low.dtype) if self.project_update else low
        return full * self.scale if self.scale != 1 else full

    def add_up_(self, state: State, low: Tensor, param: Tensor) -> None:
        param.add_(self.up(state, low, param.shape).to(param.dtype))  # a full-shape proxy: no basis product

    def state_bytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        return self.protected(shape) * sum(shape) * dtype.itemsize

    def setup(self, model: nn.Module, *, lr: float, weight_decay: float = 0.0, **inner_kwargs: Any):
        """A ``Projected`` AdamW: the targeted (or named) Linear weights projected, each with its retention."""
        named = dict(model.named_parameters())
        if isinstance(self.retention, tuple):
            if missing := [n for n, _ in self.retention if n not in named or named[n].ndim != 2]:
                raise SubspacesError(f"Sculpt retention names {missing[:3]} are not 2-D parameters of the model; "
                                     f"e.g. {[n for n, p in named.items() if p.ndim == 2][:3]}")
            chosen = {id(named[n]): r for n, r in self.retention}
        else:
            chosen = {id(p): self.retention for p in target_linear_weights(model, self.targets)}
        by_r: dict[float, list[Tensor]] = {}  # one param group per retention value
        for p in (p for p in named.values() if id(p) in chosen and p.requires_grad):
            by_r.setdefault(float(chosen[id(p)]), []).append(p)
        rest = [p for p in named.values() if p.requires_grad and id(p) not in chosen]
        groups = [{"params": ps, "projector": dataclasses.replace(self, retention=r)} for r, ps in by_r.items()]
        groups += [{"params": rest, "projector": None}] if rest else []
        opt = Projected(groups, torch.optim.AdamW, projector=None, lr=lr, weight_decay=weight_decay, **inner_kwargs)
        opt.sculpt_names = {id(p): n for n, p in named.items()}  # for next_task_(opt, {name: r})
        return opt


def next_task_(optimizer, retention: float | Mapping[str, float] | None = None, *,
               model: nn.Module | None = None) -> None:
    """At a task boundary: recompute every Sculpt parameter's protected bases from its current weight, with new
    retention ratios if given (a number, or {name: r} resolved through ``model`` or the names ``setup`` recorded),
    and reset the inner optimizer's state (moments, step counts) as a fresh optimizer per task would; the
    learning-rate schedule is the caller's to restart."""
    if not isinstance(optimizer, Projected):
        raise SubspacesError(f"next_task_ needs a Projected optimizer with Sculpt projectors, got {type(optimizer)}")
    names = getattr(optimizer, "sculpt_names", {}) if model is None else {id(p): n for n, p in model.named_parameters()}
    if isinstance(retention, Mapping) and not names:
        raise SubspacesError("next_task_ with a {name: retention} mapping needs model=... to resolve the names")
    for i, (p, g, proj) in enumerate(optimizer._projected):
        if not isinstance(proj, Sculpt):
            continue
        r = retention.get(names.get(id(p), "")) if isinstance(retention, Mapping) else retention
        if r is not None:
            proj = dataclasses.replace(proj, retention=r)
            optimizer._projected[i] = (p, g, proj)
        optimizer._states[i].update(proj.init_state(p, int(optimizer._states[i]["seed"])))  # step count -> 0
    optimizer.inner.state.clear()


def retention_from_importance(importance: Sequence[float], *, mrr: float = 0.1, trr: float = 0.8) -> list[float]:
    """r_l = mrr + Î_l (trr − mrr) with Î the min–max normalized importances (all 0.5 when they are equal)."""
    if not 0 <= mrr <= trr <= 1:
        raise SubspacesError(f"retention bounds mrr={mrr!r}, trr={trr!r}: need 0 <= mrr <= trr <= 1")
    lo, hi = min(importance), max(importance)
    return [mrr + ((i - lo) / (hi - lo) if hi > lo else 0.5) * (trr - mrr) for i in importance]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder/encoder blocks: elements of the outermost ``nn.ModuleList``s whose items all contain Linears."""
    found: list[nn.Module] = []
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and not any(mod is c for b in found for c in b.modules()):
            if all(any(isinstance(c, nn.Linear) for c in m.modules()) for m in mod):
                found += list(mod)
    if not found:
        raise SubspacesError("layer_retention found no nn.ModuleList of blocks containing nn.Linear layers")
    return found


@torch.no_grad()
def layer_retention(model: nn.Module, batches: Iterable[dict[str, Tensor]], *, mrr: float = 0.1,
                    trr: float = 0.8) -> dict[str, float]:
    """{weight name: r} for every Linear weight inside a block, from the input/output cosine of each block on
    ``batches`` (dicts of model inputs, e.g. previous-task samples; ``attention_mask`` masks padding)."""
    blocks, batch, was_training = transformer_blocks(model), {}, model.training
    sums, counts = [0.0] * len(blocks), [0.0] * len(blocks)

    def hook(i: int):
        def fn(mod, args, kwargs, out):  # block input: first positional argument (HF blocks) or hidden_states=
            x, y = args[0] if args else kwargs["hidden_states"], out[0] if isinstance(out, (tuple, list)) else out
            cos = nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
            m = batch.get("attention_mask")
            m = m.to(cos) if m is not None and m.shape == cos.shape else torch.ones_like(cos)
            sums[i], counts[i] = sums[i] + float((cos * m).sum()), counts[i] + float(m.sum())
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model.eval()
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not all(counts):
        raise SubspacesError("layer_retention: no hidden states were seen; pass at least one non-empty batch")
    ratios = retention_from_importance([s / c for s, c in zip(sums, counts)], mrr=mrr, trr=trr)
    param_name = {id(p): n for n, p in model.named_parameters()}
    return {param_name[id(lin.weight)]: r for b, r in zip(blocks, ratios)
            for lin in b.modules() if isinstance(lin, nn.Linear)}
