"""What AdaLoRA (adalora.py) and IncreLoRA (increlora.py) share: the SVD-shaped update
ΔW = s/(ranknum + 1e-5) · B diag(E) A (PEFT's ``SVDLinear``), its orthogonality regularizer, and the EMA smoothing
of importance scores (sensitivity Ī, uncertainty Ū, score Ī·Ū). The operations are written in PEFT's order, so that
results match PEFT's AdaLoRA (the parity test in tests/test_adalora.py sees identical E).
"""
from __future__ import annotations

import torch
from torch import nn

from .._errors import SubspacesError
from ._core import Delta, master_dtype

RANKNUM_EPS = 1e-5  # s / (ranknum + 1e-5), as PEFT and both official codes


def scaling(alpha: float, rank: int) -> float:
    """s = lora_alpha, or the rank when alpha is 0 (the official codes' rule)."""
    return alpha if alpha > 0 else float(rank)


def svd_weight(A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, s: float, ranknum: torch.Tensor) -> torch.Tensor:
    """ΔW (d_out, d_in) from A (r, d_in), E (r,), B (d_out, r)."""
    return B @ (A * E[:, None]) * s / (ranknum + RANKNUM_EPS)


def svd_forward(x: torch.Tensor, A: torch.Tensor, E: torch.Tensor, B: torch.Tensor, s: float,
                ranknum: torch.Tensor) -> torch.Tensor:
    """ΔW x without forming ΔW."""
    return (x @ (A * E[:, None]).T @ B.T) * s / (ranknum + RANKNUM_EPS)


def orth_penalty(factors: list[tuple[str, torch.Tensor]], weight: float) -> torch.Tensor | None:
    """weight · mean over the tensors of ‖P Pᵀ − I‖_F (``("A", P)``, rows are vectors) or ‖Pᵀ P − I‖_F
    (``("B", P)``, columns are vectors); the Frobenius norm is not squared, as in the codes."""
    if weight == 0 or not factors:
        return None
    total = 0
    for kind, p in factors:
        cov = p @ p.T if kind == "A" else p.T @ p
        total = total + torch.norm(cov - torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device), p="fro")
    return weight * (total / len(factors))


def ema_(module: nn.Module, name: str, ipt: torch.Tensor, beta1: float, beta2: float) -> None:
    """Ī ← β1 Ī + (1−β1) I; Ū ← β2 Ū + (1−β2)|I − Ī| (the new Ī), in non-persistent buffers ``{name}_avg``,
    ``{name}_unc`` of ``module`` (zeros at first use; they move with the module and are not saved)."""
    avg, unc = f"{name}_avg", f"{name}_unc"
    if avg not in module._buffers:
        module.register_buffer(avg, torch.zeros_like(ipt), persistent=False)
        module.register_buffer(unc, torch.zeros_like(ipt), persistent=False)
    a = beta1 * module._buffers[avg] + (1 - beta1) * ipt
    module._buffers[avg] = a
    module._buffers[unc] = beta2 * module._buffers[unc] + (1 - beta2) * (ipt - a).abs()


def ema_score(module: nn.Module, name: str) -> torch.Tensor | None:
    """Ī·Ū, or None before the first ``ema_``."""
    if f"{name}_avg" not in module._buffers:
        return None
    return module._buffers[f"{name}_avg"] * module._buffers[f"{name}_unc"]


def drop_ema(module: nn.Module, name: str) -> None:
    for suffix in ("_avg", "_unc"):
        module._buffers.pop(name + suffix, None)


class TripletDelta(Delta):
    """A delta with a schedule: ``ranknum`` (s/(ranknum + 1e-5)) and a step counter, both saved; ``t`` mirrors
    ``step`` in Python so that the schedule reads it without a device sync."""

    def _init_counters(self, layer: nn.Module, rank: int) -> None:
        w = layer.weight
        self.register_buffer("ranknum", torch.tensor(float(rank), device=w.device, dtype=master_dtype(w)))
        self.register_buffer("step", torch.zeros((), dtype=torch.long, device=w.device))
        self.t = 0

    def prepare_load(self, state: dict[str, torch.Tensor]) -> None:
        self.t = int(state["step"]) if "step" in state else 0

    def tick(self) -> None:
        self.t += 1
        self.step.fill_(self.t)


def check_common(config) -> None:
    """alpha >= 0, β1, β2 in (0, 1), orth_reg_weight >= 0 (the checks both methods share)."""
    name = config.registry_name
    for field in ("alpha", "orth_reg_weight"):
        v = getattr(config, field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise SubspacesError(f"{name} {field}={v!r}: must be a number >= 0")
    for field in ("beta1", "beta2"):
        v = getattr(config, field)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise SubspacesError(f"{name} {field}={v!r}: must be in (0, 1)")
