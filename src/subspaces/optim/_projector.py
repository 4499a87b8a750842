"""The Projector contract: a frozen config plus three pure functions over a per-parameter state of plain tensors.

A projector maps the gradient ``G`` (m, n) of a 2-D parameter to a small proxy (``down``) and the inner
optimizer's update of that proxy back to the parameter's shape (``up``); ``update`` refreshes its basis when due.
All of a parameter's projector state lives in one ``dict[str, Tensor]`` (bases, indices, counters, seeds), so an
optimizer checkpoint loads with ``torch.load(weights_only=True)`` and a resumed run repeats the same steps.

Sides (GaLore's "std" rule): a tall or square ``G`` (m >= n) is projected on the right, ``G Q`` (m, r) with the
basis ``Q`` (n, r); a wide ``G`` (m < n) on the left, ``Qᵀ G`` (r, n) with ``Q`` (m, r). ``Q`` always has the
basis vectors as columns, so the moment rotation after a refresh is one r×r matrix ``R = Q_oldᵀ Q_new`` either way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._errors import SubspacesError

State = dict[str, Tensor]
ON_SWITCH = ("keep", "reset", "rotate")


def side_of(shape: torch.Size | tuple[int, ...]) -> str:
    """``"right"`` for a tall or square (m, n) matrix (m >= n), ``"left"`` for a wide one: the smaller side."""
    m, n = shape
    return "right" if m >= n else "left"


def check_positive_int(method: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SubspacesError(f"{method} {name}={value!r}: must be an integer >= 1")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Projector:
    """Base class of gradient projectors (GaLore, DCT, random, ...).

    Args:
        rank: width r of the proxy; a parameter whose smaller side is below r is not projected at all.
        update_every: refresh the basis every this many steps of the parameter (GaLore's T).
        scale: α multiplying the back-projected update (GaLore's ``scale``).
        on_switch: what happens to the inner optimizer's state of a proxy when its basis is refreshed:
            ``"keep"`` (GaLore's behaviour: the moments are reinterpreted in the new basis), ``"reset"`` (fresh
            state), ``"rotate"`` (moments mapped into the new basis by ``R = Q_oldᵀ Q_new``; second moments, whose
            key contains "sq", take ``|·|`` after the rotation).
        targets: name fragments of the modules whose ``nn.Linear`` weights ``setup`` projects (GaLore's LLaMA
            code: "attn" and "mlp"); every other parameter gets the inner optimizer unprojected.
    """

    registry_name: ClassVar[str]
    #: False for projectors that keep the full shape (Sculpting Subspaces): every 2-D parameter is projected.
    low_rank: ClassVar[bool] = True

    rank: int = 128
    update_every: int = 200
    scale: float = 1.0
    on_switch: str = "keep"
    targets: tuple[str, ...] = ("attn", "mlp", "attention")

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.on_switch not in ON_SWITCH:
            raise SubspacesError(f"{name} on_switch={self.on_switch!r}: allowed {ON_SWITCH}")
        check_positive_int(name, "rank", self.rank)
        check_positive_int(name, "update_every", self.update_every)
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or self.scale <= 0:
            raise SubspacesError(f"{name} scale={self.scale!r}: must be a number > 0")

    # ------------------------------------------------------------------ geometry
    def applies_to(self, shape: torch.Size) -> bool:
        """Whether a parameter of ``shape`` is projected (2-D, and at least the rank on its smaller side)."""
        return len(shape) == 2 and (not self.low_rank or min(shape) >= self.rank)

    def proxy_shape(self, shape: torch.Size) -> tuple[int, int]:
        m, n = shape
        return (m, self.rank) if side_of(shape) == "right" else (self.rank, n)

    # ------------------------------------------------------------------ state and refresh
    def init_state(self, param: Tensor, seed: int) -> State:
        """The initial state of one parameter; ``seed`` is distinct per parameter and stable across runs."""
        return {"step": torch.zeros((), dtype=torch.int64), "seed": torch.tensor(seed, dtype=torch.int64)}

    def due(self, step: int) -> bool:
        """Whether the basis is refreshed at this step (counted from 0): steps 0, T, 2T, ... as GaLore."""
        return step % self.update_every == 0

    def refresh(self, state: State, grad: Tensor) -> None:
        """Recompute the basis from the current gradient (in place in ``state``)."""
        raise NotImplementedError

    def basis(self, state: State, shape: torch.Size, like: Tensor) -> Tensor:
        """The current basis ``Q`` (s, r) of a parameter of ``shape`` (orthonormal columns, or the random matrix), in
        ``like``'s dtype and device."""
        raise NotImplementedError

    def rotation(self, old: State, new: State, like: Tensor) -> Tensor:
        """``R = Q_oldᵀ Q_new`` (r, r): the old basis vectors' coordinates in the new basis (``on_switch="rotate"``)."""
        return self.basis(old, like.shape, like).T.float() @ self.basis(new, like.shape, like).float()

    # ------------------------------------------------------------------ the projection
    def down(self, state: State, grad: Tensor) -> Tensor:
        Q = self.basis(state, grad.shape, grad)
        return grad @ Q if side_of(grad.shape) == "right" else Q.T @ grad

    def up(self, state: State, low: Tensor, shape: torch.Size) -> Tensor:
        """The update in the parameter's shape, α included."""
        Q = self.basis(state, shape, low)
        full = low @ Q.T if side_of(shape) == "right" else Q @ low
        return full * self.scale if self.scale != 1 else full

    def add_up_(self, state: State, low: Tensor, param: Tensor) -> None:
        """``param += up(low)`` fused into one ``addmm_`` (no (m, n) temporary); ``Projected`` steps with this."""
        Q = self.basis(state, param.shape, param)
        if side_of(param.shape) == "right":
            param.addmm_(low.to(param.dtype), Q.T.to(param.dtype), alpha=self.scale)
        else:
            param.addmm_(Q.to(param.dtype), low.to(param.dtype), alpha=self.scale)

    # ------------------------------------------------------------------ memory (ss.optim.expected_state_bytes)
    def state_bytes(self, shape: torch.Size, dtype: torch.dtype) -> int:
        """Bytes of this projector's own non-scalar state for one parameter (bases, indices; not the moments)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ ss.optim.setup_
    def setup(self, model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, **inner_kwargs: Any):
        """A ``Projected`` AdamW over ``model``: the Linear weights under ``targets`` projected, the rest plain."""
        from ._projected import Projected

        projected = target_linear_weights(model, self.targets)
        ids = {id(p) for p in projected}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        groups = [{"params": projected}, {"params": rest, "projector": None}]
        return Projected([g for g in groups if g["params"]], torch.optim.AdamW, projector=self, lr=lr,
                         weight_decay=weight_decay, **inner_kwargs)


def target_linear_weights(model: torch.nn.Module, targets: tuple[str, ...]) -> list[Tensor]:
    """Trainable weights of the ``nn.Linear`` modules whose qualified name contains one of ``targets``."""
    found = [m.weight for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and any(t in name for t in targets)]
    if not found:
        raise SubspacesError(f"no trainable nn.Linear under a module named like {list(targets)}; pass targets=...")
    return found
