"""Plain compression baselines for EoRA and friends: round-to-nearest quantization and magnitude pruning.

No quantization library is needed: weights are *fake-quantized* (replaced by their dequantized values in the
same dtype), which is exactly what an error-compensation method sees of a real low-bit kernel.

- ``quantize_rtn_``: group-wise asymmetric round-to-nearest (the "RTN" baseline of GPTQ, AWQ, EoRA). Per output
  row and per group of ``group_size`` input columns, with the group's min m and max M:
  s = (M − m)/(2^b − 1), z = round(−m/s), q = clamp(round(w/s) + z, 0, 2^b − 1), ŵ = s(q − z); |w − ŵ| <= s/2.
  The integer zero point z (as GPTQ's packed format) keeps that bound: m and M land within s/2 of the grid.
- ``prune_magnitude_``: per-layer unstructured magnitude pruning; exactly round(sparsity · numel) weights of each
  layer become zero (the smallest |w|, ties broken by position).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._targets import Selector


def _layers(model: nn.Module, targets: Selector, exclude: Selector | None) -> dict[str, nn.Linear]:
    from ._core import target_linears

    return target_linears(model, targets, exclude)


def rtn(W: Tensor, bits: int, group_size: int | None = 128) -> Tensor:
    """The dequantized group-wise asymmetric RTN of ``W`` (out, in), in ``W``'s dtype; ``group_size=None``: one
    group per row. A last group shorter than ``group_size`` is quantized on its own."""
    out, d_in = W.shape
    g = d_in if group_size is None else min(group_size, d_in)
    w = W.detach().to(torch.float64 if W.dtype == torch.float64 else torch.float32)
    pad = (-d_in) % g
    if pad:  # pad with copies of the last column: min and max of the short last group are unchanged
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    w = w.reshape(out, -1, g)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    qmax = 2 ** bits - 1
    scale = (hi - lo) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / safe)
    q = torch.clamp(torch.round(w / safe) + zero, 0, qmax)
    deq = torch.where(scale > 0, (q - zero) * safe, w)  # a constant group is stored exactly by its zero point
    return deq.reshape(out, -1)[:, :d_in].to(W.dtype)


def _check(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise SubspacesError(f"{name}={value!r}: {allowed}")


@torch.no_grad()
def quantize_rtn_(model: nn.Module, *, bits: int = 4, group_size: int | None = 128,
                  targets: Selector = "all-linear", exclude: Selector | None = None) -> dict[str, Any]:
    """Fake-quantize the targeted Linears' weights in place (biases stay in full precision).

    Returns ``{"method": "rtn", "bits", "group_size", "bits_per_weight", "params_before", "params_after",
    "layers": [{name, shape, weight_error}]}``; ``bits_per_weight`` counts a 16-bit scale and a ``bits``-bit zero
    point per group; ``weight_error`` is ‖W − Ŵ‖_F/‖W‖_F.
    """
    _check("bits", bits, isinstance(bits, int) and not isinstance(bits, bool) and 1 <= bits <= 16,
           "must be an integer in 1..16 (4 and 8 are usual)")
    _check("group_size", group_size, group_size is None or (isinstance(group_size, int)
           and not isinstance(group_size, bool) and group_size >= 1), "must be a positive integer or None (per row)")
    rows, bpw = [], []
    for name, layer in _layers(model, targets, exclude).items():
        W = layer.weight
        new = rtn(W, bits, group_size)
        err = float((W.double() - new.double()).norm() / W.double().norm().clamp_min(1e-300))
        W.copy_(new)
        g = W.shape[1] if group_size is None else min(group_size, W.shape[1])
        bpw.append((bits + (16 + bits) / g, W.numel()))
        n = sum(p.numel() for p in layer.parameters())
        rows.append({"name": name, "shape": list(W.shape), "params_before": n, "params_after": n,
                     "weight_error": err})
    total = sum(n for _, n in bpw)
    params = sum(r["params_before"] for r in rows)
    return {"method": f"rtn{bits}", "bits": bits, "group_size": group_size,
            "bits_per_weight": sum(b * n for b, n in bpw) / total, "params_before": params,
            "params_after": params, "layers": rows}


@torch.no_grad()
def prune_magnitude_(model: nn.Module, *, sparsity: float, targets: Selector = "all-linear",
                     exclude: Selector | None = None) -> dict[str, Any]:
    """Zero the ``round(sparsity · numel)`` smallest-magnitude weights of every targeted Linear, in place.

    Returns ``{"method": "magnitude", "sparsity", "params_before", "params_after" (nonzero weights + biases),
    "layers": [{name, shape, sparsity, weight_error}]}``.
    """
    _check("sparsity", sparsity, isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool)
           and 0.0 <= sparsity < 1.0, "must be a number in [0, 1)")
    rows = []
    for name, layer in _layers(model, targets, exclude).items():
        W = layer.weight
        k = int(round(sparsity * W.numel()))
        flat = W.view(-1) if W.is_contiguous() else W.reshape(-1)
        before = flat.double().norm()
        order = torch.argsort(flat.abs(), stable=True)
        removed = flat[order[:k]].double().norm()
        flat[order[:k]] = 0
        if not W.is_contiguous():
            W.copy_(flat.view_as(W))
        n = sum(p.numel() for p in layer.parameters())
        rows.append({"name": name, "shape": list(W.shape), "sparsity": k / W.numel(), "params_before": n,
                     "params_after": n - k, "weight_error": float(removed / before.clamp_min(1e-300))})
    return {"method": "magnitude", "sparsity": float(sparsity),
            "params_before": sum(r["params_before"] for r in rows),
            "params_after": sum(r["params_after"] for r in rows), "layers": rows}
