"""``compress_``: replace a model's targeted Linears by compressed modules, with a per-layer report.

The Compressor contract (one file per method, registered in ``COMPRESS``): a frozen keyword-only config with

- ``needs``: a frozenset of calibration statistics from ``_calibrate.KINDS`` (``"inputs"``, ``"outputs"``,
  ``"fisher"``), empty for data-free methods;
- ``compress(layer, rank, stats) -> nn.Module``: the replacement of one ``nn.Linear`` (usually
  ``ss.nn.LowRankLinear``) at the allocated rank; ``stats`` is the layer's ``LayerStats`` (``None`` without
  calibration). The module exposes ``.weight`` (the dense equivalent, for the report) and is saved by
  ``save_compressed`` if its class is known there.
Ranks are allocated before any statistics exist (block-by-block calibration sees each block only after the earlier
ones are compressed), so the energy-based allocations use the singular values of the weights themselves.

Model-level methods (whole attention layers, distillation after factorization) define instead
``compress_model(model, *, calibration, ratio, rank, energy, targets, exclude, allocation, progress, **kw) -> dict``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import COMPRESS
from .._targets import Selector, select
from ..nn import LowRankLinear
from . import _calibrate
from ._budget import allocate
from ._calibrate import LayerStats


def config_for(method: str | Any, hyperparameters: Mapping[str, Any]) -> Any:
    """The method's config object from a registry key and keyword hyperparameters (or a config as given)."""
    if isinstance(method, str):
        cls = COMPRESS.get(method).obj
        try:
            return cls(**hyperparameters)
        except TypeError as e:
            raise SubspacesError(f"compress method {method!r}: {e}") from None
    if hyperparameters:
        raise SubspacesError("give hyperparameters either in the config object or as keywords, not both")
    if not (hasattr(method, "compress") or hasattr(method, "compress_model")):
        raise SubspacesError(f"method must be a registered name or a compress config, got {type(method).__name__}")
    return method


def target_linears(model: nn.Module, targets: Selector, exclude: Selector | None) -> dict[str, nn.Linear]:
    """The targeted plain ``nn.Linear`` modules (not the halves of an existing LowRankLinear)."""
    inner = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, LowRankLinear) for c in ("down", "up")}
    chosen = select(model, targets, exclude)
    found = {n: m for n, m in chosen if isinstance(m, nn.Linear) and n not in inner}
    if not found and inner & {n for n, _ in chosen}:
        raise SubspacesError(f"targets={targets!r}: every selected Linear is already compressed (inside a LowRankLinear)")
    if not found:
        kinds = sorted({type(m).__name__ for _, m in chosen})
        raise SubspacesError(f"targets={targets!r} select no nn.Linear to compress (selected: {kinds})")
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dense(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    w = module.weight
    b = module.bias if hasattr(module, "bias") else getattr(getattr(module, "up", None), "bias", None)
    return w.detach().to(torch.float64), None if b is None else b.detach().to(torch.float64)


def errors(old: nn.Linear, new: nn.Module, stats: LayerStats | None) -> tuple[float, float | None]:
    """Relative weight error ‖W − W'‖_F/‖W‖_F and relative output error on the calibration inputs,
    (E‖y − y'‖²/E‖y‖²)^½ from the input moments (biases included)."""
    W, b = _dense(old)
    W2, b2 = _dense(new)
    dW = W - W2
    werr = float(dW.norm() / W.norm().clamp_min(1e-300))
    if stats is None or stats.tokens == 0:
        return werr, None
    M, mu = stats.input_moment(), stats.input_mean()
    zero = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    db = (b if b is not None else zero) - (b2 if b2 is not None else zero)
    b = b if b is not None else zero

    def energy(A: Tensor, c: Tensor) -> float:
        return float(((A @ M) * A).sum() + 2 * c @ (A @ mu) + c @ c)

    return werr, math.sqrt(max(energy(dW, db), 0.0) / max(energy(W, b), 1e-300))


def compress_(
    model: nn.Module,
    method: str | Any,
    *,
    ratio: float | None = None,
    rank: int | Mapping[str, int] | None = None,
    energy: float | None = None,
    targets: Selector = "all-linear",
    exclude: Selector | None = None,
    calibration: Iterable[Any] | None = None,
    allocation: str = "uniform",
    loss_fn: Any = None,
    progress: bool = False,
    sampler: Any = None,
    **hyperparameters: Any,
) -> dict[str, Any]:
    """Compress ``model`` in place with ``method`` (a ``COMPRESS`` key or config) and return the report.

    Args:
        ratio: fraction of the targeted Linears' weight parameters to remove; ``allocation`` picks the per-layer
            ranks under that budget (``"uniform"``, ``"energy"``, ``"welore"``; see ``_budget``).
        rank: a rank for every targeted layer, or ``{layer name: rank}`` (the others stay dense).
        energy: per layer, the smallest rank keeping this fraction of Σσ².
        targets, exclude: which Linears (PEFT's matching rules, ``"all-linear"`` skips the output head).
        calibration: batches (tensors of input ids or dicts of model inputs) for methods that need statistics;
            with calibration the report also gives each layer's output error. Give unpadded batches.
        loss_fn: ``loss_fn(model, batch) -> loss`` for Fisher statistics (default: the model's own loss).
        progress: show a progress bar over blocks.
        sampler: ``compress.sampling.RowSampler(m=...)``: input statistics from ~m leverage-sampled tokens per layer.
        hyperparameters: the method's config fields (``svd="randomized"``, ``damping=...``).

    Returns:
        ``{"method", "allocation", "target_ratio", "params_before", "params_after", "ratio", "layers": [...]}``,
        one row per targeted layer: name, shape (out, in), rank (``None``: left dense), parameters before/after,
        relative weight error and relative output error on the calibration data.
    """
    config = config_for(method, hyperparameters)
    name = getattr(type(config), "registry_name", type(config).__name__)
    batches = _calibrate.check_batches(calibration)
    if hasattr(config, "compress_model"):
        if sampler is not None:
            raise SubspacesError(f"compress method {name!r} collects its own statistics: sampler= does not apply")
        return config.compress_model(model, calibration=batches, ratio=ratio, rank=rank, energy=energy,
                                     targets=targets, exclude=exclude, allocation=allocation, progress=progress)
    needs = set(getattr(config, "needs", frozenset()))
    if needs and batches is None:
        raise SubspacesError(f"compress method {name!r} needs calibration data ({', '.join(sorted(needs))}): "
                             "pass calibration=[batch, ...]")
    layers = target_linears(model, targets, exclude)
    shapes = {n: tuple(m.weight.shape) for n, m in layers.items()}
    spectra = None
    if allocation != "uniform" or energy is not None:
        spectra = {n: torch.linalg.svdvals(m.weight.detach().float()) for n, m in layers.items()}
    ranks = allocate(shapes, spectra, ratio=ratio, rank=rank, energy=energy, allocation=allocation)
    fisher = _calibrate.fisher(model, layers, batches, loss_fn) if "fisher" in needs else {}
    kinds = (needs - {"fisher"}) | ({"inputs"} if batches is not None else set())
    rows: list[dict[str, Any]] = []

    def process(lname: str, layer: nn.Linear, stats: LayerStats) -> None:
        if lname in fisher:
            stats.fisher_in, stats.fisher_out = fisher[lname].fisher_in, fisher[lname].fisher_out
            stats.batches = fisher[lname].batches
        stats = stats if batches is not None else None
        r = ranks[lname]
        new = layer if r is None else config.compress(layer, r, stats)
        werr, oerr = (0.0, 0.0 if stats is not None else None) if new is layer else errors(layer, new, stats)
        if new is not layer:
            set_module(model, lname, new)
        rows.append({"name": lname, "shape": list(shapes[lname]), "rank": r, "params_before": _params(layer),
                     "params_after": _params(new), "weight_error": werr, "output_error": oerr})

    bar = _bar(progress, f"compress {name}")
    with torch.no_grad():
        # run_sequential pops each layer once processed, so a replaced Linear is freed right away.
        _calibrate.run_sequential(model, layers, batches or [], kinds, process, progress=bar, sampler=sampler)
    order = {n: i for i, n in enumerate(shapes)}
    rows.sort(key=lambda row: order[row["name"]])
    before = sum(r["params_before"] for r in rows)
    after = sum(r["params_after"] for r in rows)
    return {"method": name, "allocation": allocation, "target_ratio": ratio, "params_before": before,
            "params_after": after, "ratio": 1.0 - after / before, "layers": rows}


def _bar(enabled: bool, desc: str):
    if not enabled:
        return lambda it: it
    from tqdm.auto import tqdm

    return lambda it: tqdm(it, desc=desc, unit="block")
