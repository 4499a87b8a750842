"""aTLAS: learned anisotropic (per-block) scaling of task vectors.

Zhang et al., "Knowledge Composition using Task Vectors with Learned Anisotropic Scaling", NeurIPS 2024,
https://arxiv.org/abs/2407.02880. Official code: https://github.com/fredzzhang/atlas (src/composition.py,
src/learn_few_shots.py).

Rule: θ_b = θ0_b + Σ_t Σ_k λ_{t,b,k} (1[m_b = k] ⊙ τ_{t,b}); Λ = 0 at the start (exactly the base model), trained with
AdamW + cosine decay on cross-entropy (few labelled examples) or prediction entropy (unlabelled data).

Blocks: every parameter tensor (``named_parameters``, tied weights once) with a task-vector entry -- weights, biases
and norm scales alike, as in the paper. Buffers (BatchNorm statistics, ...) stay at θ0, as in the official code, which
composes only the parameters. Trained numbers: T·P (blockwise, default), T (``blockwise=False``: learned task
arithmetic) or T·P·K (``partitions=K``: aTLAS×K); θ0 and τ are frozen. The model runs through
``torch.func.functional_call``; it is never modified or wrapped.

Deviations: the composition is formed in float32 (τ held in float32, T copies of the model) and cast to each
parameter's dtype, with no autocast or grad scaler; lr defaults to 0.1, the value learn_few_shots.py sets for the
coefficients (args.py's 1e-3 is for weights); partition masks are drawn from ``seed``, one per distinct block shape
(as the official code), stored as uint8 (so K <= 256). Not implemented: the linearized (jvp) variant, the LP++ and
Tip-Adapter add-ons, data augmentation, and the block selection that saves memory.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import MERGE
from ._atlas_train import cosine, evaluate, few_shot, objective, tasks
from ._shards import check_new_output
from ._learned import learning, merged_state_dict
from ._learned_inputs import check_model, config_of, forward, heads, save, task_vectors as learned_task_vectors

__all__ = ["atlas", "run", "ATLAS", "AtlasResult", "Composition", "compose", "few_shot"]
_INPUTS = ("data", "logits", "val")  # run() arguments that are not hyperparameters


@dataclass(frozen=True, kw_only=True)
class ATLAS:
    """Hyperparameters of aTLAS (official defaults except where the module docstring says)."""
    objective: str = "cross_entropy"  # or "entropy" (unlabelled; labels, if any, are ignored)
    blockwise: bool = True
    partitions: int = 1
    epochs: int = 10
    lr: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {"objective": self.objective in ("cross_entropy", "entropy"),
                  "partitions": isinstance(self.partitions, int) and 1 <= self.partitions <= 256,
                  "epochs": isinstance(self.epochs, int) and self.epochs >= 1, "lr": self.lr > 0,
                  "weight_decay": self.weight_decay >= 0, "grad_clip": self.grad_clip is None or self.grad_clip > 0}
        allowed = {"objective": "'cross_entropy' or 'entropy'", "partitions": "an integer in 1..256",
                   "epochs": "an integer >= 1", "lr": "> 0", "weight_decay": ">= 0", "grad_clip": "> 0 or None"}
        for name, ok in checks.items():
            if not ok:
                raise SubspacesError(f"atlas: {name}={getattr(self, name)!r}; allowed: {allowed[name]}")
        if self.partitions > 1 and not self.blockwise:
            raise SubspacesError("atlas: partitions > 1 needs blockwise=True (partitions split each block)")


@dataclass
class Composition:
    """θ(Λ) = θ0 + Σ_t Λ_t τ_t per block. ``taus[b]``: the T task vectors of block b stacked, float32."""
    names: list[str]
    base: dict[str, torch.Tensor]  # every parameter and buffer of the model at θ0 (detached)
    taus: list[torch.Tensor]
    masks: list[torch.Tensor | None]  # partition index of every entry (uint8), or None

    def params(self, lam: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameters and buffers at Λ = ``lam`` of shape (T,), (T, P) or (T, P, K)."""
        out = dict(self.base)
        for b, (name, tau, mask) in enumerate(zip(self.names, self.taus, self.masks)):
            c = lam if lam.dim() == 1 else lam[:, b]
            # (T, K) -> one coefficient per entry (T, *shape) through the block's mask; else broadcast (T, 1, ...)
            c = c[:, mask.long()] if lam.dim() == 3 else c.view(-1, *([1] * (tau.dim() - 1)))
            out[name] = (self.base[name].float() + (c * tau).sum(0)).to(self.base[name].dtype)
        return out


def compose(model: nn.Module, task_vectors: Sequence[Mapping[str, torch.Tensor]], *, partitions: int = 1,
            seed: int = 0) -> Composition:
    """The blocks of ``model`` (θ0 = its own tensors) and their task vectors (missing entries are zero)."""
    theta0 = {k: v.detach() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    names = [k for k, _ in model.named_parameters() if any(k in tv for tv in task_vectors)]
    taus, masks, drawn, gen = [], [], {}, torch.Generator().manual_seed(seed)
    for k in names:
        ref = theta0[k]
        bad = [list(tv[k].shape) for tv in task_vectors if k in tv and tv[k].shape != ref.shape]
        if bad:
            raise SubspacesError(f"atlas: task vector {k!r} has shape {bad[0]}, the model {list(ref.shape)}")
        taus.append(torch.stack([tv[k].detach().to(ref.device, torch.float32) if k in tv else
                                 torch.zeros(ref.shape, device=ref.device) for tv in task_vectors]))
        if partitions > 1 and ref.shape not in drawn:  # one random partition per distinct shape (official)
            drawn[ref.shape] = torch.randint(partitions, ref.shape, generator=gen).to(torch.uint8)
        masks.append(drawn[ref.shape].to(ref.device) if partitions > 1 else None)
    return Composition(names, theta0, taus, masks)


@dataclass
class AtlasResult:
    state_dict: dict[str, torch.Tensor]  # θ0 + Σ Λ τ for every key of the model's state dict, in the base dtypes
    coefficients: torch.Tensor  # Λ: (T, P), (T,) or (T, P, K) -- the only trained numbers
    blocks: list[str]  # the P block names, in coefficient order
    losses: list[float] = field(default_factory=list)  # training loss per step
    best: float | None = None  # best validation score (accuracy, or −entropy without labels) when ``val`` is given


def atlas(model: nn.Module, task_vectors: Sequence[Mapping[str, torch.Tensor]], data: Any, *,
          logits: Callable | Mapping[Any, Callable] | None = None, val: Any = None, **hp: Any) -> AtlasResult:
    """Learn Λ for ``task_vectors`` (dicts name → θ_t − θ0) on ``model`` (θ0 = its weights; it is only read, and run
    in eval mode: no dropout).

    ``data``: batches ``inputs``, ``(inputs, labels)`` or dicts with "labels" (inputs: Tensor → ``model(x)``, tuple →
    ``model(*x)``, dict → ``model(**x)``), or ``{task: batches}`` for several tasks (losses summed each step);
    :func:`few_shot` builds the paper's k-shot sets. ``logits`` maps the model output to logits: a callable
    ``f(output)`` or ``f(output, inputs)``, or ``{task: callable}`` for task-specific heads (default: the output or
    its ``.logits``). ``val`` (same format): Λ is scored at 0 and after every epoch and the best kept (accuracy with
    labels, else lowest entropy), as the official script does. Hyperparameters: the fields of :class:`ATLAS`.
    """
    cfg = config_of("atlas", ATLAS, hp, _INPUTS)
    comp = compose(model, task_vectors, partitions=cfg.partitions, seed=cfg.seed)
    if not comp.names:
        raise SubspacesError("atlas: no task vectors, or none of their keys is a parameter name of the model")
    device = comp.base[comp.names[0]].device
    t, p = len(task_vectors), len(comp.names)
    shape = (t, p, cfg.partitions) if cfg.partitions > 1 else (t, p) if cfg.blockwise else (t,)
    lam = torch.zeros(shape, device=device, requires_grad=True)  # Λ = 0: exactly the base model
    data = {k: b if hasattr(b, "__len__") else list(b) for k, b in tasks(data).items()}
    fns = heads(logits, list(data))
    if (steps := min(len(b) for b in data.values())) == 0:
        raise SubspacesError("atlas: data has no batches")
    opt = torch.optim.AdamW([lam], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine(opt, cfg.epochs * steps)  # no warm-up, as the official script

    def score() -> float:
        acc, ent = evaluate(model, comp.params(lam.detach()), val, logits, device)
        return acc if acc is not None else -ent

    losses = []
    with learning(model):
        best, best_lam = (score(), lam.detach().clone()) if val is not None else (None, None)
        for _ in range(cfg.epochs):
            for batches in zip(*data.values()):
                params, loss = comp.params(lam), 0.0
                for head, batch in zip(fns, batches):
                    loss = loss + objective(*forward(model, params, batch, head, device), cfg.objective)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_([lam], cfg.grad_clip)
                opt.step()
                sched.step()
                losses.append(loss.item())
            if val is not None and (s := score()) > best:
                best, best_lam = s, lam.detach().clone()
    final = best_lam if val is not None else lam.detach().clone()
    with torch.no_grad():
        return AtlasResult(merged_state_dict(model, comp.params(final)), final, comp.names, losses, best)


def run(*, base: nn.Module, models: Sequence[Any], out: Any = None, **hp: Any) -> dict[str, torch.Tensor]:
    """``ss.merge("atlas", base=<nn.Module>, models=[...], data=..., logits=..., val=..., **ATLAS fields)``: θ0 = the
    weights of ``base``; ``models`` are paths, state dicts or modules. Returns the merged state dict; with ``out``,
    also writes a Hugging Face folder (Λ and the block names in merge_config.json)."""
    cfg = config_of("atlas", ATLAS, {k: v for k, v in hp.items() if k not in _INPUTS}, _INPUTS)  # before loading
    check_model("atlas", base)
    if "data" not in hp:
        raise SubspacesError("atlas needs data=: batches of inputs, (inputs, labels), or {task: batches}")
    if out is not None:
        check_new_output(out)
    models = list(models.values() if isinstance(models, Mapping) else models)
    res = atlas(base, learned_task_vectors(base, models), **hp)
    if out is not None:
        save(out, "atlas", models, res, dataclasses.asdict(cfg), blocks=res.blocks, best=res.best)
    return res.state_dict


atlas.kind, atlas.run = "learned", run
MERGE.register("atlas", paper="https://arxiv.org/abs/2407.02880", status="partial",
               note="no linearized (jvp) variant, LP++/Tip-Adapter add-ons or memory-saving block selection")(atlas)
