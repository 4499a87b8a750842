"""What a method name means to a fine-tuning recipe: a baseline, an adapter (``ss.adapt_``) or a train-family
optimizer (``ss.optim.setup_``); one parser of method specs (``"lora:rank=16,alpha=32"``) for the CLI and compare."""
from __future__ import annotations

from typing import Any

from .._errors import SubspacesError, did_you_mean

#: The rows every leaderboard of a task kind can hold besides the methods: no training, or every parameter trained.
BASELINES = {"classification": ("probe", "full"), "causal-lm": ("zero-shot", "full")}


def kind_of(name: str) -> str:
    """``"baseline"``, ``"adapter"`` or ``"train"``; unknown names are listed with the valid ones."""
    import subspaces.adapters  # noqa: F401  (importing registers the methods)
    import subspaces.optim  # noqa: F401
    from .._registry import ADAPTERS, TRAIN

    if name in ("probe", "zero-shot", "full"):
        return "baseline"
    if name in ADAPTERS:
        return "adapter"
    if name in TRAIN:
        return "train"
    valid = ["probe", "zero-shot", "full", *(e.name for e in ADAPTERS), *(e.name for e in TRAIN)]
    raise SubspacesError(f"unknown method {name!r}." + did_you_mean(name, valid))


def check_method(name: str, task_kind: str | None = None) -> str:
    kind = kind_of(name)
    if kind == "baseline" and task_kind is not None and name not in BASELINES[task_kind]:
        raise SubspacesError(f"method {name!r} is not a baseline of a {task_kind} task; its baselines: "
                             f"{', '.join(BASELINES[task_kind])}")
    return kind


def check_setup(method: str, task_kind: str, hyperparameters: dict[str, Any], adapter: Any) -> str:
    """The method's kind, after checking that its hyperparameters and starting adapter make sense for it."""
    kind = check_method(method, task_kind)
    if kind != "adapter" and adapter is not None:
        raise SubspacesError(f"method {method!r} cannot start from an adapter")
    if kind == "baseline" and hyperparameters:
        raise SubspacesError(f"method {method!r} takes no hyperparameters")
    return kind


def parse_params(text: str, context: str) -> dict[str, Any]:
    """``"rank=16,alpha=32,targets=[query, value]"`` -> a dict; values are read as YAML scalars or lists."""
    import yaml

    hp: dict[str, Any] = {}
    depth, item = 0, ""
    for ch in text + ",":  # split on commas outside brackets
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            if item.strip():
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise SubspacesError(f"{context}: expected key=value,... (got {item!r})")
                try:
                    hp[key.strip()] = _number(yaml.safe_load(value))
                except yaml.YAMLError:
                    raise SubspacesError(f"{context}: cannot parse the value of {key.strip()!r}") from None
            item = ""
        else:
            item += ch
    if depth:
        raise SubspacesError(f"{context}: unbalanced brackets in {text!r}")
    return hp


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``3e-2`` (no dot) as a string: take it as the float a user means."""
    if isinstance(value, str) and any(c.isdigit() for c in value):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_method(spec: str, task_kind: str | None = None) -> tuple[str, dict[str, Any]]:
    """``"lora"`` or ``"lora:rank=16,alpha=32,targets=[query, value]"`` -> (name, hyperparameters)."""
    name, _, rest = spec.partition(":")
    check_method(name.strip(), task_kind)
    return name.strip(), parse_params(rest, f"method {spec!r}")


def default_targets(model: Any) -> list[str] | str:
    """The LoRA paper's choice, W_q and W_v, under the names this architecture uses; else all linear layers."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    for pair in (["query", "value"], ["q_proj", "v_proj"], ["q", "v"]):
        if set(pair) <= names:
            return pair
    return "all-linear"


def has_field(method: str, name: str) -> bool:
    """Whether adapter ``method``'s config has field ``name`` (``total_steps`` of a rank schedule, ...)."""
    import dataclasses

    from .._registry import ADAPTERS

    return method in ADAPTERS and name in {f.name for f in dataclasses.fields(ADAPTERS.get(method).obj)}


def train_optimizer(model: Any, method: str, hp: dict[str, Any], *, lr: float, weight_decay: float = 0.0):
    """Every parameter trainable, optimized by train-family ``method`` (GaLore, DCT, SLTrain, ...); methods that
    reparameterize change ``model`` in place first."""
    import subspaces as ss

    model.requires_grad_(True)
    return ss.optim.setup_(model, method, lr=lr, weight_decay=weight_decay, **hp)
