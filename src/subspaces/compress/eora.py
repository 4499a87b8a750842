"""EoRA: training-free compensation of a compressed model in the eigenspace of its input activations (Liu et al.,
"EoRA: Fine-tuning-free Compensation for Compressed LLM with Eigenspace Low-Rank Approximation", 2024,
https://arxiv.org/abs/2410.21271). Official code: https://github.com/NVlabs/EoRA (also GPTQModel's ``eora``).

For a compressed layer W_c = W − ΔW (quantized, pruned, low-rank, ...) and its input moment C = E[xxᵀ] = QΛQᵀ:

    ΔW' = ΔW Q Λ^½ ≈ U_r S_r V_rᵀ,   B = U_r S_r^½,   A = S_r^½ V_rᵀ Λ^-½ Qᵀ,   y = W_c x + B A x,

the exact minimizer of ‖(ΔW − B A) C^½‖_F (the output error on the calibration inputs). Non-positive
eigenvalues are replaced by the smallest positive one (as the official code does for negative ones).

Layers are processed block by block (``_calibrate.run_sequential``): the compensated blocks feed the next. A
compressed ``nn.Linear`` gets the compensation as a LoRA adapter (alpha = rank, so scaling 1 and W_c + B A exact),
which ``ss.export_lora`` writes in PEFT's format and which can initialize LoRA fine-tuning; an
``ss.nn.LowRankLinear`` is extended instead (down' = [down; A], up' = [up, B], rank + r).

Deliberate choices (the model is the same in exact arithmetic):
- A is computed as S_r^-½ U_rᵀ ΔW, equal to S_r^½ V_rᵀ Λ^-½ Qᵀ (V_r = ΔW'ᵀ U_r S_r^-1) but free of Λ^-½: it
  stays accurate when C is rank-deficient (fewer calibration tokens than input features) and with the randomized
  SVD. Directions with S_i = 0 are left out (B A = 0 when W_c = W).
- ``factor_bits`` fake-quantizes A and B group-wise (RTN; the paper quantizes them and finds the loss small).
- The fused EoRA CUDA kernel is not provided: the branch runs as two thin matmuls (PEFT's LoRA forward).
"""
from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import COMPRESS
from .._targets import Selector, select
from ..linalg import truncated_svd
from ..nn import LowRankLinear
from . import _calibrate
from ._core import _bar, _params, compress_, errors, set_module, target_linears
from ._quantize import prune_magnitude_, quantize_rtn_, rtn
from .svd import check_svd

QUANT_BASES = {"rtn4": 4, "rtn8": 8}


def eora_delta(dW: Tensor, C: Tensor, rank: int, *, svd: str = "exact") -> tuple[Tensor, Tensor]:
    """``(B (out, r), A (r, in))`` in float64 minimizing ‖(dW − B A) C^½‖_F, for ``dW`` (out, in) and the input
    second moment ``C`` (in, in), symmetric positive semi-definite with at least one positive eigenvalue."""
    check_svd("eora_delta", svd)
    if dW.dim() != 2 or C.shape != (dW.shape[1], dW.shape[1]):
        raise SubspacesError(f"eora_delta needs dW (out, in) and C (in, in); got {tuple(dW.shape)} and "
                             f"{tuple(C.shape)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(dW.shape):
        raise SubspacesError(f"eora_delta rank={rank!r} for a {tuple(dW.shape)} error: use 1..{min(dW.shape)}")
    dW = dW.detach().to(torch.float64)
    lam, Q = torch.linalg.eigh(C.detach().to(device=dW.device, dtype=torch.float64))
    positive = lam > 0
    if not bool(positive.any()):
        raise SubspacesError("eora_delta: C has no positive eigenvalue (no input energy to weight the error by)")
    lam = torch.where(positive, lam, lam[positive].min())
    U, S, _ = truncated_svd(dW @ (Q * lam.sqrt()), rank, method=svd)  # ΔW' = ΔW Q Λ^½
    keep = S > S[0] * max(dW.shape) * torch.finfo(torch.float64).eps
    root = torch.where(keep, S, torch.ones_like(S)).sqrt()
    B = U * torch.where(keep, root, torch.zeros_like(root))
    A = torch.where(keep[:, None], (U.T @ dW) / root[:, None], torch.zeros_like(dW[:rank]))
    return B, A


def _layers(model: nn.Module, targets: Selector, exclude: Selector | None) -> dict[str, nn.Module]:
    """Targeted nn.Linear and LowRankLinear modules (a LowRankLinear stands for its ``down`` and ``up``)."""
    lowrank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    found: dict[str, nn.Module] = {}
    for name, module in select(model, targets, exclude):
        parent = name.rpartition(".")[0]
        if parent in lowrank and name.rpartition(".")[2] in ("down", "up"):
            name, module = parent, model.get_submodule(parent)
        if isinstance(module, (nn.Linear, LowRankLinear)):
            found.setdefault(name, module)
    if not found:
        raise SubspacesError(f"targets={targets!r} select no nn.Linear or LowRankLinear to compensate")
    return found


def _reference(reference: nn.Module | Mapping[str, Tensor], layers: dict[str, nn.Module]) -> dict[str, Tensor]:
    out = {}
    for name, layer in layers.items():
        try:
            module = isinstance(reference, nn.Module)
            w = reference.get_submodule(name).weight if module else reference[f"{name}.weight"]
        except (AttributeError, KeyError):
            raise SubspacesError(f"reference has no weight for {name!r} (the uncompressed model or its state dict "
                                 "with '<layer>.weight' keys)") from None
        if tuple(w.shape) != (layer.out_features, layer.in_features):
            raise SubspacesError(f"reference weight of {name!r} has shape {tuple(w.shape)}, the compressed layer "
                                 f"is ({layer.out_features}, {layer.in_features})")
        out[name] = w
    return out


def _dense(layer: nn.Module) -> Tensor:
    if isinstance(layer, LowRankLinear):
        return layer.up.weight.detach().double() @ layer.down.weight.detach().double()
    return layer.weight.detach().double()


def eora_(model: nn.Module, reference: nn.Module | Mapping[str, Tensor], calibration: Iterable[Any], *,
          rank: int, targets: Selector = "all-linear", exclude: Selector | None = None, svd: str = "exact",
          factor_bits: int | None = None, group_size: int | None = 128, progress: bool = False) -> dict[str, Any]:
    """Compensate the compressed ``model`` in place towards ``reference`` (the uncompressed model, or a state dict
    with ``"<layer>.weight"`` keys) with rank-``rank`` EoRA terms, calibrated on ``calibration`` batches.

    Targeted ``nn.Linear`` layers get a LoRA adapter (the model is then frozen as by ``ss.adapt_``); targeted
    ``LowRankLinear`` layers grow by ``rank``. ``factor_bits`` fake-quantizes A and B (RTN, ``group_size``).
    Returns ``{"method": "eora", "rank", "params_added", "layers": [{name, shape, rank, params_added,
    weight_error_before, weight_error, output_error_before, output_error}]}``; errors are relative to the
    reference layer (output errors on the calibration inputs the layer sees).
    """
    from ..adapters._core import DELTA, adapt_

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise SubspacesError(f"eora rank={rank!r}: must be a positive integer")
    check_svd("eora", svd)
    if factor_bits is not None and (isinstance(factor_bits, bool) or not isinstance(factor_bits, int)
                                    or not 2 <= factor_bits <= 16):
        raise SubspacesError(f"eora factor_bits={factor_bits!r}: must be None or an integer in 2..16")
    batches = _calibrate.check_batches(calibration)
    if batches is None:
        raise SubspacesError("eora needs calibration data: pass calibration=[batch, ...]")
    layers = _layers(model, targets, exclude)
    ref = _reference(reference, layers)
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    for n in linears:
        if rank >= min(layers[n].weight.shape):
            raise SubspacesError(f"eora rank={rank} must be < min(out, in) = {min(layers[n].weight.shape)} of "
                                 f"{n!r} (a full-rank correction is the dense weight itself)")
    if linears:
        from ..adapters.lora import LoRA

        with torch.random.fork_rng(devices=[]):  # LoRA's random init of A is overwritten below
            adapt_(model, LoRA(rank=rank, alpha=float(rank)), targets=linears)
    rows: list[dict[str, Any]] = []

    def process(name: str, layer: nn.Module, stats: _calibrate.LayerStats) -> None:
        if stats.tokens == 0:
            raise SubspacesError(f"eora: the calibration batches never reach {name!r}; exclude it")
        W = ref[name].detach().to(device=stats.xxt.device, dtype=torch.float64)
        Wc = _dense(layer)
        r = min(rank, min(W.shape))
        B, A = eora_delta(W - Wc, stats.input_moment(), r, svd=svd)
        if factor_bits is not None:
            B, A = rtn(B, factor_bits, group_size), rtn(A, factor_bits, group_size)
        bias = layer.bias if isinstance(layer, nn.Linear) else layer.up.bias
        if isinstance(layer, nn.Linear):
            delta = layer._modules[DELTA]
            delta.A.copy_(A)
            delta.B.copy_(B)
            after = Wc + delta.B.double() @ delta.A.double() * delta.scaling
            added = _params(delta)
        else:
            new = LowRankLinear.from_factors(torch.cat([layer.up.weight.double(), B], dim=1),
                                             torch.cat([layer.down.weight.double(), A]), bias, like=layer.down.weight)
            set_module(model, name, new)
            after, added = _dense(new), _params(new) - _params(layer)
        ns = types.SimpleNamespace
        old = ns(weight=W, bias=bias)
        werr0, oerr0 = errors(old, ns(weight=Wc, bias=bias), stats)
        werr, oerr = errors(old, ns(weight=after, bias=bias), stats)
        rows.append({"name": name, "shape": list(W.shape), "rank": r, "params_added": added,
                     "weight_error_before": werr0, "weight_error": werr, "output_error_before": oerr0,
                     "output_error": oerr})

    with torch.no_grad():
        order = {n: i for i, n in enumerate(layers)}
        _calibrate.run_sequential(model, layers, batches, {"inputs"}, process, progress=_bar(progress, "eora"))
    rows.sort(key=lambda row: order[row["name"]])
    return {"method": "eora", "rank": rank, "params_added": sum(r["params_added"] for r in rows), "layers": rows}


def _changed(model: nn.Module, name: str, weight: Tensor) -> bool:
    """A layer the base compressed into something EoRA can compensate (other module kinds are left as they are)."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        return False
    return isinstance(layer, LowRankLinear) or (isinstance(layer, nn.Linear) and not torch.equal(layer.weight, weight))


@COMPRESS.register("eora", paper="https://arxiv.org/abs/2410.21271", status="complete",
                   note="bases: any layer-level compress method, rtn4/rtn8 (RTN) or magnitude pruning; GPTQ/SparseGPT "
                        "are not shipped (compensate them with eora_); no fused CUDA kernel")
@dataclasses.dataclass(frozen=True, kw_only=True)
class EoRA:
    """Compress with ``base``, then add rank-``rank`` EoRA compensation (``compress_(model, EoRA(rank=16,
    base="rtn4"), calibration=...)``).

    ``base``: a ``COMPRESS`` key (``ratio`` / ``rank`` / ``energy`` / ``allocation`` of ``compress_`` and
    ``base_options`` go to it), ``"rtn4"`` / ``"rtn8"`` (RTN with ``group_size``; no budget keywords) or
    ``"magnitude"`` (``ratio`` is the sparsity, default 0.5). EoRA's parameters come on top of the base budget;
    the report counts them. ``factor_bits`` fake-quantizes A and B.
    """

    rank: int = 16
    base: str = "svd"
    group_size: int | None = 128
    factor_bits: int | None = None
    base_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    svd: str = "exact"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise SubspacesError(f"EoRA rank={self.rank!r}: must be a positive integer")
        if self.base == "eora" or (self.base not in QUANT_BASES and self.base != "magnitude"
                                   and self.base not in COMPRESS):
            allowed = ", ".join([*QUANT_BASES, "magnitude", *(e.name for e in COMPRESS if e.name != "eora")])
            raise SubspacesError(f"EoRA base={self.base!r}; allowed: {allowed}")
        if self.base_options and self.base not in COMPRESS:
            raise SubspacesError(f"EoRA base_options apply to a compress method base, not base={self.base!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise SubspacesError(f"EoRA group_size={self.group_size!r}: must be a positive integer or None")
        check_svd("EoRA", self.svd)

    def compress_model(self, model: nn.Module, *, calibration: Any, ratio: float | None, rank: Any,
                       energy: float | None, targets: Selector, exclude: Selector | None, allocation: str,
                       progress: bool, **kw: Any) -> dict[str, Any]:
        if calibration is None:
            raise SubspacesError("compress method 'eora' needs calibration data (inputs): pass calibration=[...]")
        layers = target_linears(model, targets, exclude)
        names = list(layers)
        snapshot = {f"{n}.weight": m.weight.detach().clone() for n, m in layers.items()}
        before = {n: _params(m) for n, m in layers.items()}
        given = [k for k, v in (("ratio", ratio), ("rank", rank), ("energy", energy)) if v is not None]
        if self.base in QUANT_BASES or self.base == "magnitude":
            bad = given if self.base in QUANT_BASES else [g for g in given if g != "ratio"]
            if bad:
                raise SubspacesError(f"EoRA base={self.base!r} takes no {bad[0]}= budget (EoRA's own rank is "
                                     f"the config's: EoRA(rank=..., base={self.base!r}))")
            if self.base == "magnitude":
                base_report = prune_magnitude_(model, sparsity=0.5 if ratio is None else ratio, targets=names)
            else:
                base_report = quantize_rtn_(model, bits=QUANT_BASES[self.base], group_size=self.group_size,
                                            targets=names)
        else:
            base_report = compress_(model, self.base, ratio=ratio, rank=rank, energy=energy, targets=names,
                                    calibration=calibration, allocation=allocation, progress=progress,
                                    **dict(self.base_options))
        base_rows = {r["name"]: r for r in base_report["layers"]}
        changed = [n for n in names if _changed(model, n, snapshot[f"{n}.weight"])]
        comp = {"layers": [], "params_added": 0}
        if changed:
            comp = eora_(model, snapshot, calibration, rank=self.rank, targets=changed, svd=self.svd,
                         factor_bits=self.factor_bits, group_size=self.group_size, progress=progress)
        comp_rows = {r["name"]: r for r in comp["layers"]}
        errs = ("weight_error_before", "weight_error", "output_error_before", "output_error")
        rows = []
        for n in names:
            none = {"rank": 0, "params_added": 0, **dict.fromkeys(errs, 0.0)}
            b, c = base_rows.get(n, {}), comp_rows.get(n, none)
            rows.append({"name": n, "shape": list(snapshot[f"{n}.weight"].shape), "rank": b.get("rank"),
                         "eora_rank": c["rank"], "params_before": before[n],
                         "params_after": b.get("params_after", before[n]) + c["params_added"],
                         **{k: c[k] for k in errs}})
        total_before, total_after = sum(before.values()), sum(r["params_after"] for r in rows)
        return {"method": "eora", "base": self.base, "eora_rank": self.rank, "allocation": allocation,
                "target_ratio": ratio, "params_before": total_before, "params_after": total_after,
                "eora_params": comp["params_added"], "ratio": 1.0 - total_after / total_before,
                "base_report": base_report, "layers": rows}
