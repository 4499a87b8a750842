"""``Projected``: any torch optimizer run on low-rank projections of the gradients (GaLore's wrapper, written once).

Each projected parameter W (m, n) gets a proxy tensor P of the projector's small shape. At every step the proxy is
set to zero, given the projected gradient ``down(G)`` as its gradient, and the inner optimizer (AdamW by default)
steps it; the proxy then holds exactly the inner optimizer's update, which goes back through ``up`` onto W. The
inner optimizer's moments therefore live in the projected space, at the proxy's size. Decoupled weight decay is
applied to the full W after the update (GaLore's order); the proxies themselves carry none. Parameters that are
not projected (1-D, too small, or in a group with ``projector=None``) go to the inner optimizer unchanged.

Param groups may override ``projector`` (a ``Projector`` or None) and ``rank`` per group. The optimizer's
``param_groups`` are the user's groups, so LR schedulers, gradient clipping, gradient accumulation and the Hugging
Face ``Trainer(optimizers=(opt, scheduler))`` work as with any torch optimizer; with DDP every rank sees the same
averaged gradient and so computes the same bases.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .._errors import SubspacesError
from ._projector import Projector, State, side_of

_OWN_KEYS = ("params", "projector", "rank")  # group keys that never reach the inner optimizer


class Projected(torch.optim.Optimizer):
    """Run ``inner`` on projected gradients.

    Args:
        params: parameters or param groups (dicts; a group may set ``projector`` and ``rank``).
        inner: a torch optimizer class (``torch.optim.AdamW``, ``SGD``, ...) run on the proxies.
        projector: the default projector, e.g. ``ss.optim.GaLore(rank=128, update_every=200, scale=0.25)``.
        seed: base seed of seeded projectors (one distinct, stable seed per parameter).
        **inner_kwargs: the inner optimizer's hyperparameters (``lr``, ``betas``, ``weight_decay``, ...).

    Example::

        opt = ss.optim.Projected(model.parameters(), torch.optim.AdamW, lr=1e-2,
                                 projector=ss.optim.GaLore(rank=128, update_every=200, scale=0.25))
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        inner: type[torch.optim.Optimizer] = torch.optim.AdamW,
        *,
        projector: Projector | None,
        seed: int = 0,
        **inner_kwargs: Any,
    ) -> None:
        if projector is not None and not isinstance(projector, Projector):
            raise SubspacesError(f"projector must be a Projector such as ss.optim.GaLore(rank=...), got {projector!r}")
        if not (isinstance(inner, type) and issubclass(inner, torch.optim.Optimizer)):
            raise SubspacesError(f"inner must be a torch.optim.Optimizer class, got {inner!r}")
        # The projected parameters decay by the inner optimizer's own default when none is given (AdamW: 0.01).
        wd = inner_kwargs.get("weight_decay", _default(inner, "weight_decay", 0.0))
        defaults = {**inner_kwargs, "weight_decay": wd, "projector": projector}
        super().__init__(params, defaults)

        # Per projected parameter: (param, group index, projector); proxies and states in the same order.
        self._projected: list[tuple[Tensor, int, Projector]] = []
        self._proxies: list[Tensor] = []
        self._states: list[State] = []
        inner_groups: list[dict[str, Any]] = []
        self._inner_of: list[tuple[int | None, int | None]] = []  # user group -> (plain, proxy) inner group
        index = 0
        for g, group in enumerate(self.param_groups):
            proj = group["projector"]
            if proj is not None and group.get("rank") is not None:
                proj = dataclasses.replace(proj, rank=group["rank"])
            hyper = _inner_hyper(group)
            plain, proxies = [], []
            for p in group["params"]:
                if proj is not None and proj.applies_to(p.shape):
                    proxy = torch.zeros(proj.proxy_shape(p.shape), dtype=p.dtype, device=p.device, requires_grad=True)
                    self._projected.append((p, g, proj))
                    self._proxies.append(proxy)
                    self._states.append(proj.init_state(p, _param_seed(seed, index)))
                    proxies.append(proxy)
                else:
                    plain.append(p)
                index += 1
            slots = [None, None]
            for k, (ps, wd) in enumerate(((plain, hyper.get("weight_decay")), (proxies, 0.0))):
                if ps:
                    slots[k] = len(inner_groups)
                    inner_groups.append({**hyper, "params": ps, **({"weight_decay": wd} if wd is not None else {})})
            self._inner_of.append((slots[0], slots[1]))
        if not inner_groups:
            raise SubspacesError("Projected got no parameters")
        try:
            self.inner = inner(inner_groups, **{k: v for k, v in inner_kwargs.items() if k != "weight_decay"})
        except TypeError as e:
            raise SubspacesError(f"{inner.__name__} rejected the hyperparameters: {e}") from None

    # ------------------------------------------------------------------ the step
    def _sync_hyperparameters(self) -> None:
        """Copy the (possibly scheduled) hyperparameters of each user group onto its inner groups."""
        for group, (plain, proxy) in zip(self.param_groups, self._inner_of):
            hyper = _inner_hyper(group)
            for slot in (plain, proxy):
                if slot is not None:
                    target = self.inner.param_groups[slot]
                    for k, v in hyper.items():
                        if k in target and not (slot == proxy and k == "weight_decay"):
                            target[k] = v

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        active = []
        for i, ((p, _, proj), proxy, state) in enumerate(zip(self._projected, self._proxies, self._states)):
            if p.grad is None:
                proxy.grad = None
                continue
            grad = p.grad
            step = int(state["step"])
            if proj.due(step):
                old = {k: v.clone() for k, v in state.items()} if step > 0 and proj.on_switch == "rotate" else None
                proj.refresh(state, grad)
                if step > 0:
                    R = proj.rotation(old, state, grad) if old is not None else None
                    self._switch(proxy, proj.on_switch, R, side_of(p.shape))
            proxy.zero_()
            proxy.grad = proj.down(state, grad).to(proxy.dtype)
            active.append(i)
        self.inner.step()
        for i in active:
            p, g, proj = self._projected[i]
            proxy, state = self._proxies[i], self._states[i]
            proj.add_up_(state, proxy, p)
            wd = self.param_groups[g].get("weight_decay", 0.0) or 0.0
            if wd:
                p.mul_(1 - self.param_groups[g]["lr"] * wd)
            state["step"] += 1
            proxy.grad = None
        return loss

    def _switch(self, proxy: Tensor, on_switch: str, R: Tensor | None, side: str) -> None:
        """The projector's ``on_switch`` rule applied to the inner optimizer's state of ``proxy``."""
        state = self.inner.state.get(proxy)
        if not state or on_switch == "keep":
            return
        if on_switch == "reset":
            self.inner.state[proxy] = {}
            return
        R = R.float()
        for key, t in state.items():
            if isinstance(t, Tensor) and t.shape == proxy.shape:
                rot = t.float() @ R if side == "right" else R.T @ t.float()
                state[key] = (rot.abs() if "sq" in key else rot).to(t.dtype)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.inner.zero_grad(set_to_none)

    # ------------------------------------------------------------------ checkpoints (plain tensors only)
    def state_dict(self) -> dict[str, Any]:
        groups = [{k: v for k, v in g.items() if k not in _OWN_KEYS} for g in self.param_groups]
        return {
            "inner": self.inner.state_dict(),
            "projectors": [dict(s) for s in self._states],
            "param_groups": groups,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = {"inner", "projectors", "param_groups"} - set(state_dict)
        if missing:
            raise SubspacesError(f"not a Projected optimizer state: missing {sorted(missing)}")
        if len(state_dict["projectors"]) != len(self._states) or len(state_dict["param_groups"]) != len(self.param_groups):
            raise SubspacesError(
                f"the checkpoint has {len(state_dict['projectors'])} projected parameters in "
                f"{len(state_dict['param_groups'])} groups; this optimizer has {len(self._states)} in "
                f"{len(self.param_groups)}: build it over the same parameters and groups"
            )
        self.inner.load_state_dict(state_dict["inner"])
        for (p, _, _), state, saved in zip(self._projected, self._states, state_dict["projectors"]):
            state.clear()
            state.update({k: v.cpu() if k in ("step", "seed") else v.to(p.device) for k, v in saved.items()})
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)

    def projector_states(self) -> list[tuple[Tensor, Projector, State]]:
        """(parameter, projector, state) of every projected parameter, for inspection and tests."""
        return [(p, proj, s) for (p, _, proj), s in zip(self._projected, self._states)]

    def proxy_of(self, param: Tensor) -> Tensor | None:
        for (p, _, _), proxy in zip(self._projected, self._proxies):
            if p is param:
                return proxy
        return None


def _inner_hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in _OWN_KEYS}


def _default(cls: type, name: str, fallback: Any) -> Any:
    import inspect

    p = inspect.signature(cls.__init__).parameters.get(name)
    return p.default if p is not None and p.default is not inspect.Parameter.empty else fallback


def _param_seed(seed: int, index: int) -> int:
    from ..adapters._core import stable_seed

    return stable_seed("projected", seed, index)
