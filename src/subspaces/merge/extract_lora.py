"""Extract a LoRA from a fine-tuned model against its base: per targeted Linear, ΔW = W_ft − W_0 factored into the
best rank-r B A, written as a PEFT LoRA folder (loads with ``peft.PeftModel.from_pretrained`` on the base and with
``ss.load_adapter``).

Plain (no calibration): B A = U_r Σ_r V_rᵀ of ΔW, the best rank-r approximation in Frobenius norm (Eckart–Young);
the SVD step of PEFT's / mergekit's ``extract_lora`` tools (https://github.com/arcee-ai/mergekit).
Activation-whitened (``calibration`` batches): with L the lower Cholesky factor of E[x xᵀ] of each layer's inputs in
the *fine-tuned* model, ΔW L = U Σ Vᵀ and B A = U_r Σ_r (V_rᵀ L⁻¹): the best rank-r approximation in output error
E‖(ΔW − BA)x‖² on the calibration distribution, the truncation-aware whitening of SVD-LLM (Wang et al.,
https://arxiv.org/abs/2403.07378; ``compress.svd_llm.whitening`` and the block-by-block statistics of
``compress._calibrate.run_sequential`` are reused, in float64).

Report per layer: rank, relative weight error ‖ΔW − BA‖/‖ΔW‖ and, whitened, relative output error
‖(ΔW − BA)L‖/‖ΔW L‖. Layers whose ΔW is exactly zero are left out of the adapter (reported as unchanged). Changes
outside the targeted weights (biases, norms, embeddings, the output head) cannot be expressed by a LoRA: they are
listed in the folder's ``extract_lora.json`` and raise a warning.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError, SubspacesWarning
from .._targets import Selector, select
from ..adapters._core import check_int, linear_dims, master_dtype
from ..linalg import truncated_svd
from ._lora import PeftLoRA, build, write_peft
from ._lora_method import check_out


def _load(x: Any, what: str) -> nn.Module:
    if isinstance(x, nn.Module):
        return x
    if isinstance(x, (str, Path)):
        from ..models import load_causal_lm

        return load_causal_lm(str(x), torch.float32, torch.device("cpu"))[0]
    raise SubspacesError(f"extract_lora {what}: expected an nn.Module or a Hugging Face folder, got {type(x).__name__}")


def _factor(dW: Tensor, rank: int, L: Tensor | None) -> tuple[Tensor, Tensor, float | None]:
    """(A, B, relative output error or None) of the best rank-``rank`` B A for ΔW (whitened by ``L`` if given)."""
    k = min(rank, *dW.shape)
    if L is None:
        U, S, Vh = truncated_svd(dW, k)
        root = S.sqrt()
        return root[:, None] * Vh, U * root, None
    M = dW @ L
    U, S, Vh = truncated_svd(M, k)
    root = S.sqrt()
    A = torch.linalg.solve_triangular(L.T, (root[:, None] * Vh).T, upper=True).T  # Σ^½ Vᵀ L⁻¹
    B = U * root
    return A, B, float((M - B @ (A @ L)).norm() / M.norm())


def extract_lora(base: Any, finetuned: Any, *, rank: int, targets: Selector = "all-linear",
                 calibration: Any = None, out: Any = None, damping: float = 1e-6) -> PeftLoRA:
    """A rank-``rank`` LoRA with base + LoRA ≈ ``finetuned`` on the ``targets`` Linears (models or causal-LM
    folders, same architecture). ``calibration`` (batches of input ids or dicts of model inputs): whiten by the
    fine-tuned model's layer inputs (module doc); ``damping``: SVD-LLM's diagonal loading when E[xxᵀ] is singular.
    Returns the PEFT state dict, config and per-layer report; with ``out``, writes a new PEFT folder there."""
    from ..compress._calibrate import check_batches, run_sequential
    from ..compress.svd_llm import whitening

    check_int("extract_lora", "rank", rank, 1)
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping > 0:
        raise SubspacesError(f"extract_lora damping={damping!r}: must be a number > 0")
    check_out(out)
    batches = check_batches(calibration)
    base_m, ft = _load(base, "base"), _load(finetuned, "finetuned")
    chosen = select(base_m, targets)
    ft_modules = dict(ft.named_modules())
    transposed = set()
    for name, layer in chosen:
        transposed.add(linear_dims(layer, "extract_lora")[2])
        other = ft_modules.get(name)
        if other is None or getattr(other, "weight", None) is None or other.weight.shape != layer.weight.shape:
            raise SubspacesError(f"extract_lora: the fine-tuned model has no layer {name!r} of shape "
                                 f"{tuple(layer.weight.shape)} (not the same architecture?)")
    if len(transposed) > 1:
        raise SubspacesError("extract_lora: PEFT needs one fan_in_fan_out setting; target either nn.Linear or "
                             "transformers Conv1D layers, not both")
    base_layers = dict(chosen)
    untouched = _changed_outside(base_m, ft, {f"{n}.weight" for n in base_layers})
    if untouched:
        warnings.warn(f"extract_lora: {len(untouched)} tensor(s) differ outside the targeted weights and are not in "
                      f"the LoRA (e.g. {untouched[0]!r})", SubspacesWarning, stacklevel=2)
    factors, report = {}, []

    def process(name: str, ft_layer: nn.Module, stats: Any) -> None:
        W0 = base_layers[name].weight.detach()
        work = torch.float64 if stats is not None else torch.promote_types(W0.dtype, torch.float32)
        dW = ft_layer.weight.detach().to(W0.device, work) - W0.to(work)
        dW = dW.T if transposed == {True} else dW  # (d_out, d_in)
        norm = float(dW.norm())
        if norm == 0:
            report.append({"name": name, "shape": list(dW.shape), "rank": 0, "unchanged": True})
            return
        L = None if stats is None else whitening(stats.input_moment().to(dW.device), float(damping))
        A, B, output_error = _factor(dW, rank, L)
        row = {"name": name, "shape": list(dW.shape), "rank": A.shape[0],
               "weight_error": float((dW - B @ A).norm()) / norm}
        if output_error is not None:
            row["output_error"] = output_error
        report.append(row)
        factors[name] = (A.to(master_dtype(W0)), B.to(master_dtype(W0)))

    if batches is None:
        for name in base_layers:
            process(name, ft_modules[name], None)
    else:
        run_sequential(ft, {n: ft_modules[n] for n in base_layers}, batches, {"inputs"}, process)
    if not factors:
        raise SubspacesError("extract_lora: the fine-tuned model equals the base on every targeted layer")
    order = {n: i for i, n in enumerate(base_layers)}
    report.sort(key=lambda r: order[r["name"]])
    name = str(base) if isinstance(base, (str, Path)) else getattr(getattr(base, "config", None), "_name_or_path", None)
    result = build(factors, fan_in_fan_out=transposed == {True}, base=name or None, report=report)
    if out is not None:
        write_peft(out, result, info_name="extract_lora.json", info={
            "rank": rank, "targets": targets, "whitened": batches is not None, "not_captured": untouched})
    return result


def _changed_outside(base: nn.Module, ft: nn.Module, targeted: set[str]) -> list[str]:
    """Names of floating-point tensors outside ``targeted`` that differ between the two models."""
    theirs = ft.state_dict()
    changed = []
    for k, v in base.state_dict().items():
        if k in targeted or not v.is_floating_point():
            continue
        w = theirs.get(k)
        if w is None or w.shape != v.shape:
            raise SubspacesError(f"extract_lora: tensor {k!r} is missing or reshaped in the fine-tuned model")
        if not torch.equal(w.to(v.device, v.dtype), v):
            changed.append(k)
    return changed
