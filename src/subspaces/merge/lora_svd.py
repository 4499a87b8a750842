"""LoRA merge by the optimal rank-r SVD of the summed update (the SVD step of PEFT's ``add_weighted_adapter``
``combination_type="svd"``, https://github.com/huggingface/peft; LoRA: Hu et al., https://arxiv.org/abs/2106.09685).

Rule, per adapted module: ΔW = Σ_i w_i s_i B_i A_i,  (A', B') = the best rank-r approximation of ΔW (Eckart–Young):
B' = U_r Σ_r^½, A' = Σ_r^½ V_rᵀ, merged at scale 1.

ΔW is never formed: with B = [w_1 s_1 B_1 … w_N s_N B_N] (d_out, R) and A = [A_1; …; A_N] (R, d_in), R = Σ r_i,
B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), so ΔW = Q_B (R_B R_Aᵀ) Q_Aᵀ and the SVD of the small core R_B R_Aᵀ (at most
R×R) gives ΔW's: O((d_in + d_out) R²) time, no d_out×d_in matrix. The relative Frobenius error of each module,
‖σ_{r+1:}‖ / ‖σ‖, is exact and is reported.

Deviations from PEFT: no dense ΔW and no ``full_matrices`` SVD (same result up to rounding); ``weights`` default to 1
(the plain sum, as task arithmetic); the merged adapter has one scale (1) instead of PEFT's per-adapter alphas; a rank
above the numerical ceiling min(R, d_in, d_out) is lowered to it (those components would be zero).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .._registry import MERGE
from ..adapters._core import check_int
from ._lora import PeftLoRA, read_loras
from ._lora_method import LoRAMethod, check_out, check_weights, factors, finish, work_dtype


def product_svd(B: Tensor, A: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Factors (B' (m, k), A' (k, n)) of the best rank-``rank`` approximation of ``B @ A`` (B (m, R), A (R, n)),
    k = min(rank, m, n, R), and all singular values of ``B @ A`` (descending), via QR of both factors."""
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    k = min(rank, S.shape[0])
    root = S[:k].sqrt()
    return (Qb @ U[:, :k]) * root, root[:, None] * (Vh[:k] @ Qa.T), S


def lora_svd(models: Any, *, rank: int, weights: Any = None, base: Any = None, out: Any = None) -> PeftLoRA:
    """Merge LoRA adapters (PEFT / native folders, models with a LoRA, or ``PeftLoRA``) into one rank-``rank`` LoRA:
    the best rank-``rank`` approximation of ``Σ_i weights_i · ΔW_i`` per module. Returns the PEFT state dict, config
    and report (per module: rank, relative Frobenius error); with ``out``, also writes a PEFT folder there.
    ``base`` (optional) only names the base model in ``adapter_config.json``."""
    check_int("lora_svd", "rank", rank, 1)
    check_out(out)
    sets = read_loras(models)
    w = check_weights(weights, len(sets), "lora_svd")
    work, dtype = work_dtype(sets)
    merged, report = {}, []
    for name in sets[0].modules:
        fs = factors(sets, name, w, work)
        B, A, S = product_svd(torch.cat([b for _, b in fs], dim=1), torch.cat([a for a, _ in fs]), rank)
        k = A.shape[0]
        merged[name] = (A, B)
        report.append({"name": name, "rank": k, "relative_error": float(S[k:].norm() / S.norm()) if S.norm() > 0
                       else 0.0})
    return finish("lora_svd", sets, merged, report, dtype=dtype, base=base, out=out, models=models,
                  hp={"rank": rank, "weights": w})


@MERGE.register("lora_svd", paper="https://arxiv.org/abs/2106.09685", status="complete",
                note="sum of ΔW then optimal rank-r SVD (factored, no dense ΔW)")
class LoRASVD(LoRAMethod):
    """``ss.merge("lora_svd", models=[lora, ...], rank=r, weights=None, out=None)``: see :func:`lora_svd`."""

    fn = staticmethod(lora_svd)
