"""The adapter machinery written once: attach, disable, fold, detach, trainable parameters, save and load.

A method supplies a frozen config dataclass (``AdapterConfig``) whose ``build(layer)`` returns a ``Delta``:
a small module giving ``weight()`` -> ΔW in the layout of ``layer.weight`` and ``forward(x)`` -> the branch
output, computed without materializing ΔW where the math allows.

Attach mechanism: the delta becomes the child ``delta`` of the adapted layer and a forward hook adds its
output, so the layer keeps its class and its state-dict keys; after ``fold_`` the state dict has exactly the
original keys again.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from .._targets import Selector, bypassed_linears, select

DELTA = "delta"  # child-module name of the delta inside an adapted layer
# Per-model record: requires_grad flags before adapting; modules_to_save -> their original tensors (trained in
# place, as PEFT trains its copy; the originals come back with unadapt_ and inside adapters_disabled).
_STATE = "_subspaces_state"


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Base class of adapter configs. Subclasses validate their fields in ``__post_init__``."""

    registry_name: ClassVar[str]
    #: False for methods whose paper starts from ΔW ≠ 0 (the conformance tests then skip the identity check).
    identity_at_init: ClassVar[bool] = True
    #: A data-driven initialization ``f(model, batches, loss_fn, *, lr, warmup_steps)`` run after ``adapt_``
    #: (LoRA-SB's gradient estimate); the harness calls it when given ``init_batches``.
    data_init: ClassVar[Callable | None] = None

    def build(self, layer: nn.Module, *, init: bool = True) -> Delta:
        """A delta for ``layer``; ``init=False`` skips costly initialization (the state is loaded next)."""
        raise NotImplementedError

    def num_trainable(self, layer: nn.Module) -> int:
        """The paper's trainable-parameter count for one adapted layer."""
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Training-schedule hooks (adapters/_schedule.py calls them once per optimizer step for all layers of a
    # method): a loss penalty (SoRA's L1, AdaLoRA's orthogonality) and an update after optimizer.step()
    # (proximal steps, rank allocation). Plain methods have neither.
    @classmethod
    def penalty(cls, deltas: list[Delta]) -> torch.Tensor | None:
        return None

    @classmethod
    def after_step(cls, deltas: list[Delta], *, lr: float | None, optimizer: Any = None) -> None:
        """``optimizer`` (when given) lets a method that grows its tensors register them (IncreLoRA)."""
        return None

    # Methods whose layers share tensors (MoS's shard pools, the intrinsic-dimension θ_d) create them here:
    # called once per adapt_ call (and once per saved group at load) after every layer is attached, before the
    # base offsets and before a load. The convention: the first delta owns the shared tensors as its own
    # parameters (so they are saved once and moved with the model); the others reach them through ``owner_of``.
    def share(self, deltas: list[tuple[str, Delta]], *, init: bool) -> None:
        """``deltas``: (layer name, delta) in model order."""
        return None

    def num_trainable_total(self, layers: list[nn.Module]) -> int:
        """The paper's trainable-parameter count for all ``layers`` adapted together (shared tensors once)."""
        return sum(self.num_trainable(layer) for layer in layers)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SubspacesError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)


class Delta(nn.Module):
    """The trainable part of one adapted layer."""

    active: bool = True
    #: names of this delta's parameters trained without weight decay (``ss.adapters.param_groups``)
    no_decay: tuple[str, ...] = ()

    def weight(self) -> torch.Tensor:
        """ΔW with the shape and layout of the base layer's weight."""
        raise NotImplementedError

    def offset(self) -> torch.Tensor | None:
        """A term moved out of the base weight at attach (W ← W - offset), e.g. PiSSA's principal part."""
        return None

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The adapted output: base ``output`` plus this branch applied to the layer input ``x``."""
        return output + self(x).to(output.dtype)

    def prepare_load(self, state: dict[str, torch.Tensor]) -> None:
        """Make this delta's tensors match a saved ``state`` (keys relative to the delta) before it is loaded:
        methods whose ranks change in training (AdaLoRA, IncreLoRA, Maestro) resize here, e.g. with
        ``resize_to``. By default a shape mismatch is an error."""

    def truncate_(self, rank: int) -> None:
        """Keep the leading ``rank`` components (``ss.truncate_``); only methods with an ordered basis can."""
        raise SubspacesError(f"{self.config.registry_name} has no ordered rank to truncate")


def resize_to(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give ``module``'s own parameters and buffers the shapes they have in ``state`` (values are loaded next)."""
    for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        saved = state.get(name)
        if saved is not None and saved.shape != tensor.shape:
            tensor.data = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)


def owner_of(delta: Delta) -> Delta:
    """The delta that holds the tensors ``delta`` shares with the other layers of its group (itself if none)."""
    return delta.__dict__.get("_owner", delta)


def set_owner(delta: Delta, owner: Delta) -> None:
    """Let ``delta`` reach ``owner``'s shared tensors without registering ``owner`` as its child (which would
    save the shared tensors once per layer)."""
    if owner is not delta:
        delta.__dict__["_owner"] = owner


def validate_common(config: AdapterConfig) -> None:
    """The checks every adapter config shares: a positive integer ``rank`` and ``dropout`` in [0, 1), where the
    config has them (``rank=None`` means the method derives it)."""
    name = getattr(config, "registry_name", type(config).__name__)
    rank = getattr(config, "rank", None)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise SubspacesError(f"{name} rank={rank!r}: must be a positive integer")
    dropout = getattr(config, "dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise SubspacesError(f"{name} dropout={dropout!r}: must be in [0, 1)")


def check_int(method: str, name: str, value: object, low: int) -> None:
    """An integer hyperparameter (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SubspacesError(f"{method} {name}={value!r}: must be an integer >= {low}")


def master_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype of an adapter's tensors on a base weight: fp32 on half-precision bases (the optimizer needs the
    bits, as PEFT's autocast_adapter_dtype), the base dtype otherwise."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def linear_dims(layer: nn.Module, method: str) -> tuple[int, int, bool]:
    """(d_in, d_out, transposed) of an nn.Linear or a transformers GPT-2 Conv1D (weight stored (d_in, d_out))."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        d_in, d_out = layer.weight.shape
        return d_in, d_out, True
    raise SubspacesError(f"{method} cannot adapt a {type(layer).__name__}; supported: nn.Linear, "
                         "transformers Conv1D")


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ints and strings, the same in every process (Python's ``hash`` of a str is not)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


def _hook(layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    delta = layer._modules.get(DELTA)
    if delta is None or not delta.active:
        return None
    return delta.add_to(output, args[0])


def adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` for every layer of ``model`` that carries a delta."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m._modules.get(DELTA), Delta)]


def _as_config(method_or_config: str | AdapterConfig, hyperparameters: dict) -> AdapterConfig:
    is_config = isinstance(method_or_config, AdapterConfig)
    cls = type(method_or_config) if is_config else ADAPTERS.get(method_or_config).obj
    names = sorted(f.name for f in dataclasses.fields(cls))
    unknown = sorted(set(hyperparameters) - set(names))
    if unknown:
        method = getattr(cls, "registry_name", cls.__name__)
        raise SubspacesError(f"{method}: unknown hyperparameter(s) {', '.join(unknown)}; "
                             f"hyperparameters: {', '.join(names)}")
    if is_config:
        return dataclasses.replace(method_or_config, **hyperparameters) if hyperparameters else method_or_config
    return cls(**hyperparameters)


def _freeze(model: nn.Module) -> dict:
    state = model.__dict__.get(_STATE)
    if state is None:
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        state = {"requires_grad": flags, "modules_to_save": {}, "groups": 0}
        model.__dict__[_STATE] = state
        model.requires_grad_(False)
    return state


def _attach(layer: nn.Module, name: str, config: AdapterConfig, *, init: bool, group: int) -> Delta:
    if DELTA in layer._modules:
        raise SubspacesError(f"{name} is already adapted; fold_ or unadapt_ it first")
    try:
        delta = config.build(layer, init=init)
    except SubspacesError as e:
        raise SubspacesError(f"{name}: {e}") from None
    delta.config = config
    delta.group = group  # layers adapted by one adapt_ call: the unit of shared tensors
    delta.train(layer.training)  # a new module defaults to train mode: follow the model (no dropout in eval)
    layer.add_module(DELTA, delta)
    delta._handle = layer.register_forward_hook(_hook)
    return delta


def _apply_offset(layer: nn.Module, sign: int) -> None:
    off = layer._modules[DELTA].offset()
    if off is not None:
        with torch.no_grad():
            layer.weight.add_(off.to(layer.weight.dtype), alpha=sign)


def _set_modules_to_save(model: nn.Module, state: dict, selector: Sequence[str] | None) -> None:
    if not selector:
        return
    for name, module in select(model, list(selector)):
        module.requires_grad_(True)
        if name not in state["modules_to_save"]:
            state["modules_to_save"][name] = _snapshot(module)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _load_modules(model: nn.Module, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    modules = dict(model.named_modules())
    for name, state in tensors.items():
        modules[name].load_state_dict(state)


def adapt_(
    model: nn.Module,
    method_or_config: str | AdapterConfig,
    *,
    targets: Selector,
    exclude: Selector | None = None,
    modules_to_save: Sequence[str] | None = None,
    **hyperparameters: Any,
) -> nn.Module:
    """Freeze ``model`` and attach an adapter to every module selected by ``targets`` (in place).

    ``method_or_config`` is a registry key (``"lora"``) with its hyperparameters as keywords, or a config
    object (``ss.adapters.LoRA(rank=8)``). ``modules_to_save`` (PEFT's name) lists modules trained in full
    alongside the adapter and saved with it, e.g. a fresh classification head.
    """
    config = _as_config(method_or_config, hyperparameters)
    chosen = select(model, targets, exclude)
    bypassed = sorted(bypassed_linears(model) & {n for n, _ in chosen})
    if bypassed:
        raise SubspacesError(f"cannot adapt {bypassed[0]}: nn.MultiheadAttention uses its weight without calling "
                             "its forward, so an adapter there would have no effect; exclude it")
    state = _freeze(model)
    group = state["groups"]
    done, offset = [], []
    try:
        deltas = []
        for name, layer in chosen:
            deltas.append((name, _attach(layer, name, config, init=True, group=group)))
            done.append(layer)
        config.share(deltas, init=True)
        for layer in done:
            _apply_offset(layer, -1)
            offset.append(layer)
    except BaseException:
        for layer in done:  # leave the model as it was
            _detach(layer, restore=layer in offset)
        if not adapted_layers(model):
            _restore(model, modules=True)
        raise
    state["groups"] += 1
    _set_modules_to_save(model, state, modules_to_save)
    return model


def _detach(layer: nn.Module, *, restore: bool) -> None:
    if restore:
        _apply_offset(layer, +1)
    delta = layer._modules.pop(DELTA)
    delta._handle.remove()


def _restore(model: nn.Module, *, modules: bool) -> None:
    """Forget the record: requires_grad flags as before adapting; with ``modules``, modules_to_save too."""
    state = model.__dict__.pop(_STATE, None)
    if state is not None:
        if modules:
            _load_modules(model, state["modules_to_save"])
        for n, p in model.named_parameters():
            p.requires_grad_(state["requires_grad"].get(n, p.requires_grad))


def fold_(model: nn.Module) -> nn.Module:
    """Bake every adapter into its layer's weight (W ← W + ΔW) and remove it; the state dict then has exactly
    the original keys. ``requires_grad`` flags return to what they were before ``adapt_``."""
    layers = adapted_layers(model)
    if not layers:
        raise SubspacesError("fold_: the model has no adapter")
    with torch.no_grad():
        for _, layer in layers:
            dw = layer._modules[DELTA].weight()
            layer.weight.add_(dw.to(layer.weight.dtype))
            _detach(layer, restore=False)
    _restore(model, modules=False)
    return model


def unadapt_(model: nn.Module) -> nn.Module:
    """Remove every adapter without folding it, giving back the base model as it was (modules_to_save
    included)."""
    for _, layer in adapted_layers(model):
        _detach(layer, restore=True)
    _restore(model, modules=True)
    return model


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base: adapters bypassed, modules_to_save at their original
    values; nothing is removed."""
    deltas = [layer._modules[DELTA] for _, layer in adapted_layers(model)]
    if any(d.offset() is not None for d in deltas):
        raise SubspacesError("adapters_disabled: an adapter moved part of the base weight (init='pissa'); "
                             "use unadapt_ to get the base model back")
    originals = model.__dict__.get(_STATE, {}).get("modules_to_save", {})
    modules = dict(model.named_modules())
    trained = {name: _snapshot(modules[name]) for name in originals}
    before = [d.active for d in deltas]
    for d in deltas:
        d.active = False
    _load_modules(model, originals)
    try:
        yield model
    finally:
        for d, b in zip(deltas, before):
            d.active = b
        _load_modules(model, trained)


def truncate_(model: nn.Module, rank: int | dict[str, int]) -> nn.Module:
    """Keep the leading ``rank`` components of every adapted layer (a dict gives per-layer ranks by layer name),
    deploying a smaller rank without retraining (Maestro's ordered decomposition)."""
    layers = adapted_layers(model)
    if not layers:
        raise SubspacesError("truncate_: the model has no adapter")
    if isinstance(rank, dict):
        unknown = sorted(set(rank) - {n for n, _ in layers})
        if unknown:
            raise SubspacesError(f"truncate_: {unknown[0]!r} is not an adapted layer")
    plan = [(layer, rank.get(name) if isinstance(rank, dict) else rank, name) for name, layer in layers]
    for _, k, name in plan:  # check every rank before changing any layer
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
            raise SubspacesError(f"truncate_: rank {k!r} for {name} must be a positive integer")
    for layer, k, _ in plan:
        if k is not None:
            layer._modules[DELTA].truncate_(k)
    return model


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of every adapter, plus those of ``modules_to_save``."""
    params: list[nn.Parameter] = []
    for _, layer in adapted_layers(model):
        params += [p for p in layer._modules[DELTA].parameters() if p.requires_grad]
    modules = dict(model.named_modules())
    for name in model.__dict__.get(_STATE, {}).get("modules_to_save", []):
        params += [p for p in modules[name].parameters() if p.requires_grad]
    return params


def adapter_state(model: nn.Module) -> tuple[dict[str, dict], list[str], dict[str, torch.Tensor]]:
    """(per-layer ``{"method", "config"}``, modules_to_save, tensors keyed as in ``model.state_dict()``)."""
    layers = adapted_layers(model)
    if not layers:
        raise SubspacesError("the model has no adapter to save")
    modules = {}
    tensors = {}
    for name, layer in layers:
        delta = layer._modules[DELTA]
        modules[name] = {"method": delta.config.registry_name, "config": delta.config.to_dict(),
                         "group": delta.group}
        tensors.update({f"{name}.{DELTA}.{k}": v for k, v in delta.state_dict().items()})
    saved = list(model.__dict__.get(_STATE, {}).get("modules_to_save", []))
    all_modules = dict(model.named_modules())
    for name in saved:
        tensors.update({f"{name}.{k}": v for k, v in all_modules[name].state_dict().items()})
    return modules, saved, tensors


def attach_state(model: nn.Module, modules: dict[str, dict], saved: list[str],
                 tensors: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Inverse of ``adapter_state``: attach each layer's delta, load the tensors, re-apply base offsets."""
    named = dict(model.named_modules())
    missing = [n for n in list(modules) + list(saved) if n not in named]
    if missing:
        raise SubspacesError(f"{source}: the model has no module {missing[0]!r} (the adapter was made for "
                             "another architecture?)")
    state = _freeze(model)
    attached = []
    try:
        groups: dict[tuple, list[tuple[str, Delta]]] = {}  # a saved group with one method and config shares tensors
        for name, spec in modules.items():
            if not (isinstance(spec, dict) and isinstance(spec.get("config"), dict) and "method" in spec):
                raise SubspacesError(f"{source}: the entry for {name!r} lacks its method or config")
            cls = ADAPTERS.get(spec["method"]).obj
            config = cls.from_dict(spec["config"])
            key = (spec.get("group", 0), spec["method"], repr(config))
            group = state["groups"] + list(groups).index(key) if key in groups else state["groups"] + len(groups)
            groups.setdefault(key, []).append((name, _attach(named[name], name, config, init=False, group=group)))
            attached.append(named[name])
        for deltas in groups.values():
            deltas[0][1].config.share(deltas, init=False)
        state["groups"] += len(groups)
        prefix = f".{DELTA}."
        for name, layer in zip(modules, attached):
            mine = {k[len(name) + len(prefix):]: v for k, v in tensors.items() if k.startswith(name + prefix)}
            layer._modules[DELTA].prepare_load(mine)
        own = model.state_dict()
        unexpected = sorted(set(tensors) - set(own))
        if unexpected:
            raise SubspacesError(f"{source}: tensor {unexpected[0]!r} has no place in the model")
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise SubspacesError(f"{source}: tensor {k!r} has shape {tuple(v.shape)}, "
                                     f"the model expects {tuple(own[k].shape)}")
        needed = {k for k in own if f".{DELTA}." in k and any(k.startswith(n + ".") for n in modules)}
        absent = sorted(needed - set(tensors))
        if absent:
            raise SubspacesError(f"{source}: tensor {absent[0]!r} is missing")
        _set_modules_to_save(model, state, saved)  # snapshots their originals before the load
        model.load_state_dict(tensors, strict=False)
    except BaseException:
        for layer in attached:
            _detach(layer, restore=False)
        if not adapted_layers(model):
            _restore(model, modules=True)
        raise
    for layer in attached:
        _apply_offset(layer, -1)
    return model
