"""mergekit's YAML for the methods we share: read it into a call of ``subspaces.merge`` with mergekit's semantics.

Accepted (anything else is refused with the valid keys listed)::

    merge_method: ties            # linear, task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, model_stock
    base_model: path/to/base
    models:
      - model: path/to/a
        parameters: {weight: 0.5, density: 0.3}
    parameters: {normalize: true, lambda: 1.0, rescale: true, int8_mask: true, ...}   # shared; weight/density too
    dtype: bfloat16               # every input is cast to it; also the output dtype unless out_dtype is given
    out_dtype: bfloat16

mergekit's defaults are applied (density 1, TIES normalizing, DARE rescaling to the ℓ1 norm, weight required for
task arithmetic and linear), so a config gives the merge mergekit would. ``int8_mask`` only saves mergekit memory and
is accepted and ignored. No YAML tags are evaluated (``yaml.safe_load``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .._errors import SubspacesError, did_you_mean

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
MODEL_KEYS = ("model", "parameters")
PER_MODEL = {"weight": "weights", "density": "density"}
# mergekit method -> (our method, mergekit defaults as our hyperparameters, shared parameters it accepts)
_TASK = ("weight", "density", "normalize", "lambda", "int8_mask")
METHODS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    "linear": ("linear", {"normalize": True}, ("weight", "normalize")),
    "task_arithmetic": ("task_arithmetic", {"normalize": False}, _TASK + ("rescale",)),
    "ties": ("ties", {"density": 1.0, "normalize": True, "trim": "tensor"}, _TASK + ("rescale",)),
    "dare_linear": ("dare_linear", {"density": 1.0, "normalize": False, "rescale": "l1"}, _TASK + ("rescale",)),
    "dare_ties": ("dare_ties", {"density": 1.0, "normalize": False, "rescale": "l1"}, _TASK + ("rescale",)),
    "breadcrumbs": ("breadcrumbs", {"density": 1.0, "normalize": False, "gamma": 0.01}, _TASK + ("gamma",)),
    "model_stock": ("model_stock", {}, ("filter_wise",)),
}


def _unknown(what: str, keys, valid) -> None:
    bad = [k for k in keys if k not in valid]
    if bad:
        raise SubspacesError(f"{what}: unknown key {bad[0]!r}." + did_you_mean(str(bad[0]), valid))


def _number(where: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SubspacesError(f"{where}: {key}={value!r} must be a number (per-tensor filters are not supported)")
    return float(value)


def read_config(path: str | Path) -> dict[str, Any]:
    """Parse a mergekit YAML file into keyword arguments of ``subspaces.merge.merge``."""
    import yaml

    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except yaml.MarkedYAMLError as e:  # its str() quotes the file over several lines: keep the problem and where
        mark = e.problem_mark
        raise SubspacesError(f"cannot read {path}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: "
                             f"{e.problem}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise SubspacesError(f"cannot read {path}: {e}") from None
    if not isinstance(cfg, dict):
        raise SubspacesError(f"{path}: expected a YAML mapping with merge_method, base_model and models")
    return from_mergekit(cfg, base_dir=Path(path).parent)


def _resolve(value: Any, base_dir: Path | None, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SubspacesError(f"{where}: expected a path, got {value!r}")
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None and not p.exists() and (base_dir / p).exists():
        p = base_dir / p
    return str(p)


def from_mergekit(cfg: dict[str, Any], base_dir: Path | None = None) -> dict[str, Any]:
    _unknown("merge config", cfg, TOP_KEYS)
    name = cfg.get("merge_method")
    if name not in METHODS:
        raise SubspacesError(f"merge_method {name!r} is not one we share with mergekit."
                             + did_you_mean(str(name), METHODS))
    method, hp, accepted = METHODS[name]
    hp = dict(hp)
    shared = cfg.get("parameters") or {}
    if not isinstance(shared, dict):
        raise SubspacesError("parameters: expected a mapping")
    _unknown(f"{name} parameters", shared, accepted)
    base = cfg.get("base_model")
    base = _resolve(base, base_dir, "base_model") if base is not None else None
    entries = cfg.get("models")
    if not isinstance(entries, list) or not entries:
        raise SubspacesError("models: expected a list of {model: PATH, parameters: {...}}")
    models, per_model = [], {k: [] for k in PER_MODEL if k in accepted}
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict):
            raise SubspacesError(f"models[{i}]: expected a mapping with 'model'")
        _unknown(f"models[{i}]", entry, MODEL_KEYS)
        path = _resolve(entry.get("model"), base_dir, f"models[{i}].model")
        params = entry.get("parameters") or {}
        _unknown(f"models[{i}].parameters", params, tuple(per_model) + (("gamma",) if name == "breadcrumbs" else ()))
        if base is not None and path == base and method != "linear":  # the base listed among the models: not a task
            continue
        models.append(path)
        for key, values in per_model.items():
            value = params.get(key, shared.get(key))
            values.append(None if value is None else _number(f"models[{i}]", key, value))
        if "gamma" in params:
            hp["gamma"] = _number(f"models[{i}]", "gamma", params["gamma"])
    for key, values in per_model.items():
        if all(v is None for v in values):
            if key == "weight" and method in ("linear", "task_arithmetic"):
                raise SubspacesError(f"{name}: every model needs a 'weight' parameter (as in mergekit)")
            continue
        if any(v is None for v in values):
            if key == "weight":
                raise SubspacesError(f"{name}: 'weight' is given for some models but not all")
            values = [1.0 if v is None else v for v in values]  # mergekit's default density
        hp[PER_MODEL[key]] = values
    for key, value in shared.items():
        if key in PER_MODEL or key == "int8_mask":
            continue
        if key == "lambda":
            hp["scaling"] = _number("parameters", key, value)
        elif key == "rescale":
            hp["rescale"] = "l1" if value else None
        else:
            hp[key] = value
    if method in ("ties", "task_arithmetic", "breadcrumbs") and "rescale" in hp:
        if hp.pop("rescale"):
            raise SubspacesError(f"{name}: rescale is only supported for dare_linear and dare_ties")
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    return {"method": method, "base": base, "models": models, "dtype": dtype, **hp}
