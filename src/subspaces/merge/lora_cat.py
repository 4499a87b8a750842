"""LoRA merge by concatenating ranks: the exact sum of the updates as one LoRA of rank Σ r_i (PEFT's
``add_weighted_adapter`` ``combination_type="cat"``, https://github.com/huggingface/peft; LoRA: Hu et al.,
https://arxiv.org/abs/2106.09685).

Rule, per adapted module: A' = [A_1; …; A_N], B' = [w_1 s_1 B_1, …, w_N s_N B_N], scale 1, so
B'A' = Σ_i w_i s_i B_i A_i exactly (the concatenation-summation equivalence of LoRA-LEGO's MSUs).

Deviations from PEFT: PEFT scales both factors by √w_i; we fold w_i s_i into B only (same ΔW, and negative weights
work); ``weights`` default to 1 (the plain sum).
"""
from __future__ import annotations

from typing import Any

import torch

from .._registry import MERGE
from ._lora import PeftLoRA, read_loras
from ._lora_method import LoRAMethod, check_out, check_weights, factors, finish, work_dtype


def lora_cat(models: Any, *, weights: Any = None, base: Any = None, out: Any = None) -> PeftLoRA:
    """Merge LoRA adapters into one LoRA of rank Σ r_i with ΔW = Σ_i weights_i · ΔW_i exactly (per module).
    Inputs as :func:`~subspaces.merge.lora_svd.lora_svd`; with ``out``, writes a PEFT folder."""
    check_out(out)
    sets = read_loras(models)
    w = check_weights(weights, len(sets), "lora_cat")
    work, dtype = work_dtype(sets)
    merged, report = {}, []
    for name in sets[0].modules:
        fs = factors(sets, name, w, work)
        merged[name] = (torch.cat([a for a, _ in fs]), torch.cat([b for _, b in fs], dim=1))
        report.append({"name": name, "rank": merged[name][0].shape[0], "relative_error": 0.0})
    return finish("lora_cat", sets, merged, report, dtype=dtype, base=base, out=out, models=models,
                  hp={"weights": w})


@MERGE.register("lora_cat", paper="https://arxiv.org/abs/2106.09685", status="complete",
                note="exact sum of ΔW as one LoRA of rank Σ r_i")
class LoRACat(LoRAMethod):
    """``ss.merge("lora_cat", models=[lora, ...], weights=None, out=None)``: see :func:`lora_cat`."""

    fn = staticmethod(lora_cat)
