"""Which modules an adapter attaches to, with PEFT's matching rules.

- a string: a regular expression that must match the *whole* module name (``re.fullmatch``);
- a list of strings: a module matches when its name equals an entry or ends with ``"." + entry``;
- ``"all-linear"``: every ``nn.Linear`` except the output head (output embeddings, or a classification head
  named ``classifier`` / ``score``, which PEFT trains through ``modules_to_save`` instead) and the ``out_proj``
  of ``nn.MultiheadAttention``, whose forward is never called.
``exclude`` takes the same forms and removes modules from the selection.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ._errors import SubspacesError

Selector = str | Sequence[str]
_HEAD_NAMES = ("classifier", "score", "lm_head")


def _matches(name: str, selector: Selector) -> bool:
    import re

    if isinstance(selector, str):
        return re.fullmatch(selector, name) is not None
    return any(name == key or name.endswith("." + key) for key in selector)


def _is_linear(module: nn.Module) -> bool:
    # transformers' GPT-2 Conv1D is a linear layer with a transposed weight.
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _output_heads(model: nn.Module) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (out is not None and module is out) or name.split(".")[-1] in _HEAD_NAMES:
            heads.add(name)
    return heads


def bypassed_linears(model: nn.Module) -> set[str]:
    """Linear children whose ``forward`` is never called: nn.MultiheadAttention reads ``out_proj.weight``
    directly, so a forward hook (an adapter) on it would be silently ignored while ``fold_`` still applied it."""
    return {f"{n}.out_proj" if n else "out_proj" for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention)}


def _validate(selector: Selector | None, what: str) -> None:
    if selector is None:
        return
    if isinstance(selector, str):
        import re

        try:
            re.compile(selector)
        except re.error as e:
            raise SubspacesError(f"{what}={selector!r} is not a valid regular expression: {e}") from None
    elif not (isinstance(selector, Sequence) and all(isinstance(s, str) for s in selector)):
        raise SubspacesError(f"{what} must be a regex string, a list of name suffixes or 'all-linear'")


def select(model: nn.Module, targets: Selector, exclude: Selector | None = None) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` selected by ``targets`` minus ``exclude``, in ``named_modules`` order.

    Raises SubspacesError showing real module names when nothing matches.
    """
    _validate(targets, "targets")
    _validate(exclude, "exclude")
    if targets == "all-linear":
        heads = _output_heads(model) | bypassed_linears(model)
        chosen = [(n, m) for n, m in model.named_modules() if _is_linear(m) and n not in heads]
    else:
        chosen = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if exclude is not None:
        chosen = [(n, m) for n, m in chosen if not _matches(n, exclude)]
    if not chosen:
        raise SubspacesError(
            f"targets={targets!r}" + (f" exclude={exclude!r}" if exclude is not None else "")
            + f" matches no module. Module names look like: {', '.join(_examples(model))}"
        )
    return chosen


def _examples(model: nn.Module, n: int = 12) -> list[str]:
    seen: dict[str, str] = {}
    for name, module in model.named_modules():
        if name and not list(module.children()):
            seen.setdefault(name.split(".")[-1], f"{name} ({type(module).__name__})")
    return list(seen.values())[:n]


def inspect_targets(model: nn.Module, targets: Selector, exclude: Selector | None = None) -> list[dict]:
    """Dry run: the modules ``targets`` would select, with their type, weight shape and parameter count.

    Changes nothing. Shapes are given as (out, in) like ``nn.Linear.weight``.
    """
    rows = []
    for name, module in select(model, targets, exclude):
        weight = getattr(module, "weight", None)
        rows.append({
            "name": name,
            "type": type(module).__name__,
            "shape": tuple(weight.shape) if weight is not None else None,
            "params": sum(p.numel() for p in module.parameters(recurse=False)),
        })
    return rows
