"""PELA: Guo, Wang, Kankanhalli, "PELA: Learning Parameter-Efficient Models with Low-Rank Approximation", CVPR 2024,
https://arxiv.org/abs/2310.10700 (code: https://github.com/guoyang9/PELA, ``DeiT/low_rank.py``, ``DeiT/engine.py``).

Every targeted Linear (n in, m out) becomes a balanced truncated SVD ``(U_r S_r^½)(S_r^½ V_rᵀ)`` of rank
r = ⌊nm / (c(n + m))⌋, then the low-rank student is trained against the frozen original (teacher) with
L = L_task + α·mean_b MSE(h_b^S, h_b^T) + β·MSE(logits^S, logits^T) + λ·mean_ℓ (‖B A − W‖_max − ε)².
Modules whose name contains ``norm``/``head``/``patch_embed``/``downsample`` and Linears with out_features < 10 stay.

Deliberate deviations: the intermediate stage runs ``steps`` AdamW steps over the given batches (cycled) instead of
epochs of the pretraining set, with a cosine decay to 0 and no warmup, in the model's own dtype (no autocast);
weight decay skips 1-D parameters (biases, norms), as timm's optimizer factory used by the paper does. ``h_b`` are
the model's ``hidden_states`` after each block (for LLaMA-type models the last one has the final norm applied).
The core's ``ratio`` (fraction of parameters removed) maps to c = 1/(1 − ratio); ``rank``, ``energy`` and the
non-uniform allocations are also accepted. The downstream fine-tuning stage is the user's ordinary training.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import COMPRESS
from ..nn import LowRankLinear
from . import _calibrate
from ._budget import allocate
from ._core import compress_, errors, target_linears
from .svd import SVD, check_svd


def pela_rank(n: int, m: int, c: float) -> int:
    """r = ⌊nm / (c(n + m))⌋ (exact, no float rounding): the factors' r(n + m) params are at most nm/c."""
    return math.floor(Fraction(n * m) / (Fraction(c) * (n + m)))


def feature_loss(student_hidden: Sequence[Tensor], teacher_hidden: Sequence[Tensor]) -> Tensor:
    """Mean over blocks of the per-block MSE (over all tokens and features), in float32."""
    if len(student_hidden) != len(teacher_hidden) or not student_hidden:
        raise SubspacesError(f"feature loss: student gives {len(student_hidden)} block outputs, teacher "
                             f"{len(teacher_hidden)}; both must give the same nonzero number")
    terms = [F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student_hidden, teacher_hidden)]
    return torch.stack(terms).mean()


def weight_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[LowRankLinear, Tensor]]:
    """(low-rank layer, original weight) for each LowRankLinear of the student whose name is a Linear in the teacher."""
    pairs = []
    for name, m in student.named_modules():
        if isinstance(m, LowRankLinear):
            try:
                t = teacher.get_submodule(name)
            except AttributeError:
                continue
            if isinstance(t, nn.Linear) and t.weight.shape == (m.out_features, m.in_features):
                pairs.append((m, t.weight.detach()))
    return pairs


def weight_perturbation(pairs: Sequence[tuple[LowRankLinear, Tensor]], eps: float = 1e-3) -> Tensor:
    """R_wp = mean over layers of (max |B A − W_orig| − ε)², in float32 (gradients reach both factors)."""
    if not pairs:
        raise SubspacesError("weight-perturbation term: no low-rank layer with an original weight in the teacher")
    terms = [((m.up.weight.float() @ m.down.weight.float() - w.float()).abs().amax() - eps).square()
             for m, w in pairs]
    return torch.stack(terms).mean()


def _forward(model: nn.Module, batch: dict[str, Any], hidden: bool) -> Any:
    hf = hasattr(model, "config")
    extra = {"output_hidden_states": True} if hidden and hf else {}
    if hf and hasattr(model.config, "use_cache"):
        extra["use_cache"] = False
    return _calibrate.call(model, batch, **extra)


def pela_loss(student: nn.Module, teacher: nn.Module, batch: Tensor | dict[str, Any], *, alpha: float = 1.0,
              beta: float = 0.0, reg_weight: float = 0.0, eps: float = 1e-3, task_loss: bool = True,
              pairs: Sequence[tuple[LowRankLinear, Tensor]] | None = None) -> dict[str, Tensor]:
    """PELA's objective on one batch, for any training loop (e.g. a Hugging Face ``Trainer.compute_loss``).

    ``batch``: input ids or a dict of model inputs. The task loss is the student's own loss (``labels`` in the
    batch, or ``labels = input_ids`` for a ``*ForCausalLM``; else 0). The teacher runs under ``no_grad``.
    ``pairs`` (default: ``weight_pairs(student, teacher)``) are the layers of the regularizer.
    Returns float32 scalars ``{"loss", "task", "features", "logits", "reg"}``; backpropagate ``["loss"]``.
    """
    batch = {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
    causal = type(student).__name__.endswith("ForCausalLM")
    if task_loss and causal and "labels" not in batch and "input_ids" in batch:
        batch["labels"] = batch["input_ids"]
    if not task_loss:
        batch.pop("labels", None)
    out = _forward(student, batch, hidden=alpha > 0)
    zero = torch.zeros((), device=next(student.parameters()).device)
    parts = {"task": zero, "features": zero, "logits": zero, "reg": zero}
    if task_loss and getattr(out, "loss", None) is not None:
        parts["task"] = out.loss.float()
    if alpha > 0 or beta > 0:
        with torch.no_grad():
            ref = _forward(teacher, {k: v for k, v in batch.items() if k != "labels"}, hidden=alpha > 0)
        if alpha > 0:
            hs, ht = getattr(out, "hidden_states", None), getattr(ref, "hidden_states", None)
            if hs is None or ht is None:
                raise SubspacesError("alpha > 0 needs block features: give a Hugging Face model that returns "
                                     "hidden_states (output_hidden_states=True), or set alpha=0")
            parts["features"] = feature_loss(hs[1:], ht[1:])  # hidden_states[0] is the embedding output
        if beta > 0:
            ls, lt = (o.logits if hasattr(o, "logits") else o for o in (out, ref))
            parts["logits"] = F.mse_loss(ls.float(), lt.float())
    if reg_weight > 0:
        parts["reg"] = weight_perturbation(weight_pairs(student, teacher) if pairs is None else pairs, eps)
    parts["loss"] = parts["task"] + alpha * parts["features"] + beta * parts["logits"] + reg_weight * parts["reg"]
    return parts


SKIP = ("norm", "head", "patch_embed", "downsample")


@COMPRESS.register("pela", paper="https://arxiv.org/abs/2310.10700", status="complete")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PELA:
    """SVD-initialized low-rank student + feature distillation from the frozen original (+ weight regularizer).

    ``ratio_c`` is the paper's compression ratio c (> 1; e.g. 2), an alternative to the core's ``ratio``.
    ``alpha`` = kd_alpha, ``beta`` = kd_beta, ``reg_weight`` = inf_norm_weight λ, ``eps`` = inf_norm_eps.
    Distillation runs ``steps`` AdamW steps (``lr``, ``weight_decay``) over the calibration batches, cycled.
    """

    ratio_c: float | None = None
    alpha: float = 1.0
    beta: float = 0.0
    reg_weight: float = 0.0
    eps: float = 1e-3
    steps: int = 100
    lr: float = 5e-4
    weight_decay: float = 0.05
    task_loss: bool = True
    skip: tuple[str, ...] = SKIP
    min_out_features: int = 10
    svd: str = "exact"

    def __post_init__(self) -> None:
        check_svd("PELA", self.svd)
        c = self.ratio_c
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 1):
            raise SubspacesError(f"PELA ratio_c={c!r}: must be a number > 1 (factors keep 1/c of the parameters)")
        for name in ("alpha", "beta", "reg_weight", "eps", "lr", "weight_decay"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or not math.isfinite(v):
                raise SubspacesError(f"PELA {name}={v!r}: must be a finite number >= 0")
        for name in ("steps", "min_out_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise SubspacesError(f"PELA {name}={v!r}: must be an integer >= 0")
        if isinstance(self.skip, str) or not all(isinstance(s, str) for s in self.skip):
            raise SubspacesError(f"PELA skip={self.skip!r}: must be a tuple of name substrings")

    def ranks(self, layers: dict[str, nn.Linear], *, ratio, rank, energy, allocation) -> dict[str, int]:
        """Rank per compressed layer (skipped layers are absent; a ``{name: rank}`` mapping is taken as given)."""
        given = [k for k, v in (("ratio", ratio), ("rank", rank), ("energy", energy), ("ratio_c", self.ratio_c))
                 if v is not None]
        if len(given) != 1:
            raise SubspacesError(f"PELA: give exactly one of ratio=, rank=, energy=, ratio_c= (got {given or 'none'})")
        if isinstance(rank, Mapping):
            out = allocate({n: tuple(m.weight.shape) for n, m in layers.items()}, rank=rank)
            return {n: r for n, r in out.items() if r is not None}
        kept = {n: m for n, m in layers.items()
                if not any(s in n for s in self.skip) and m.out_features >= self.min_out_features}
        shapes = {n: tuple(m.weight.shape) for n, m in kept.items()}
        c = self.ratio_c if ratio is None else 1.0 / (1.0 - _fraction(ratio))
        if c is not None and allocation == "uniform":  # the paper's rule
            out = {n: pela_rank(s[1], s[0], c) for n, s in shapes.items()}
        else:
            ratio = None if c is None else 1.0 - 1.0 / c
            spectra = None if rank is not None else {
                n: torch.linalg.svdvals(m.weight.detach().float()) for n, m in kept.items()}
            out = allocate(shapes, spectra, ratio=ratio, rank=rank, energy=energy, allocation=allocation)
        return {n: r for n, r in out.items() if r is not None and r >= 1}

    def compress_model(self, model: nn.Module, *, calibration=None, ratio=None, rank=None, energy=None,
                       targets="all-linear", exclude=None, allocation="uniform", progress=False, **kw) -> dict:
        """SVD init of the targeted Linears, then ``steps`` distillation steps against a frozen copy of the
        original model on ``calibration`` (none: the SVD init only). Returns the compress report."""
        if kw:
            raise SubspacesError(f"PELA.compress_model: unknown arguments {sorted(kw)}")
        batches = _calibrate.check_batches(calibration)
        layers = target_linears(model, targets, exclude)
        ranks = self.ranks(layers, ratio=ratio, rank=rank, energy=energy, allocation=allocation)
        if not ranks:
            raise SubspacesError(f"PELA: no targeted Linear is left to compress (skip={self.skip}, "
                                 f"min_out_features={self.min_out_features}, targeted: {sorted(layers)[:5]})")
        distill = batches is not None and self.steps > 0
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if distill else None
        report = compress_(model, SVD(svd=self.svd), rank=ranks, targets=targets, exclude=exclude)
        c = self.ratio_c or (None if ratio is None else 1.0 / (1.0 - ratio))
        report.update(method="pela", allocation=allocation, target_ratio=ratio, ratio_c=c, distilled=distill)
        if not distill:
            report["note"] = "SVD initialization only: no calibration batches (or steps=0), no distillation"
            return report
        history = self.distill(model, teacher, batches, progress=progress)
        report.update(distill_steps=len(history), distill_loss_first=history[0]["loss"],
                      distill_loss_last=history[-1]["loss"], distill_features_first=history[0]["features"],
                      distill_features_last=history[-1]["features"])
        for row in report["layers"]:  # weights moved: errors against the original weights
            if row["rank"] is not None:
                row["weight_error"], row["output_error"] = errors(
                    teacher.get_submodule(row["name"]), model.get_submodule(row["name"]), None)
        return report

    def distill(self, student: nn.Module, teacher: nn.Module, batches: Sequence[Any], *,
                progress: bool = False) -> list[dict[str, float]]:
        """``steps`` AdamW steps on ``pela_loss`` over ``batches`` (cycled); all floating student parameters
        train. The teacher is only read (eval mode, no_grad). Returns each step's loss parts."""
        params = [p for p in student.parameters() if p.is_floating_point()]
        flags = [p.requires_grad for p in params]
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(self.steps, 1))
        pairs = weight_pairs(student, teacher) if self.reg_weight > 0 else None
        modes = (student.training, teacher.training)
        student.train()
        teacher.eval()
        history = []
        try:
            for p in params:
                p.requires_grad_(True)
            for step in _steps(self.steps, progress):
                parts = pela_loss(student, teacher, batches[step % len(batches)], alpha=self.alpha, beta=self.beta,
                                  reg_weight=self.reg_weight, eps=self.eps, task_loss=self.task_loss, pairs=pairs)
                opt.zero_grad(set_to_none=True)
                parts["loss"].backward()
                opt.step()
                sched.step()
                history.append({k: float(v.detach()) for k, v in parts.items()})
        finally:
            opt.zero_grad(set_to_none=True)
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            student.train(modes[0])
            teacher.train(modes[1])
        return history


def _steps(n: int, progress: bool):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc="distill pela", unit="step")


def _fraction(ratio: object) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise SubspacesError(f"ratio={ratio!r}: must be a number in (0, 1)")
    return float(ratio)
