"""``Scheduled``: a torch optimizer plus a method's schedule run after each of its steps (SST's resampling, the
restarts' refactorization). Written once so every such method behaves the same under schedulers and checkpoints.

``param_groups`` and ``state`` are the inner optimizer's own objects, so LR schedulers, gradient clipping and the
Hugging Face ``Trainer`` act on the optimizer that steps; ``inner`` is what ``ss.optim.state_bytes`` measures.
The state dict is ``{"inner": ..., "schedule": {...}}`` of plain tensors (``torch.load(weights_only=True)``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._errors import SubspacesError


class Scheduled(torch.optim.Optimizer):
    """Steps ``inner``, counts the step in ``self.steps``, then calls ``after_step()``."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        if not isinstance(inner, torch.optim.Optimizer):
            raise SubspacesError(f"{type(self).__name__} needs a torch optimizer to wrap, got {type(inner).__name__}")
        self.inner, self.steps = inner, 0
        super().__init__([dict(g) for g in inner.param_groups], inner.defaults)  # copies; replaced just below
        self._alias()

    def _alias(self) -> None:
        self.param_groups, self.state = self.inner.param_groups, self.inner.state

    def after_step(self) -> None:
        raise NotImplementedError

    def schedule_state(self) -> dict[str, torch.Tensor]:
        """The schedule's own state (plain tensors); subclasses extend it."""
        return {"step": torch.tensor(self.steps, dtype=torch.int64)}

    def load_schedule_state(self, state: dict[str, torch.Tensor]) -> None:
        self.steps = int(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.inner.step()
        self.steps += 1
        self.after_step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "schedule": self.schedule_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"inner", "schedule"} - set(state_dict)
        if missing:
            raise SubspacesError(f"not a {type(self).__name__} state dict: missing {sorted(missing)}; save it with "
                                 f"{type(self).__name__}.state_dict()")
        self.inner.load_state_dict(state_dict["inner"])
        self._alias()  # load_state_dict gives the inner optimizer new state / group containers
        self.load_schedule_state(state_dict["schedule"])
