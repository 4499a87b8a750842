"""SAID: structure-aware intrinsic dimension (Aghajanyan, Zettlemoyer & Gupta, ACL 2021).
https://arxiv.org/abs/2012.13255

θ_i = θ0_i + λ_i · P_i θ_d for each adapted weight tensor i: the random-subspace method of ``intrinsic`` (Li et al.
2018, one seeded projection P_i per tensor, Fastfood by default) plus one trainable scalar λ_i per tensor,
initialized to 1 (θ_d to 0, so the model starts at θ0). The paper's headline: 200 such parameters bring RoBERTa to
90% of full fine-tuning on MRPC.

Budget: ``dim`` = d is the total trainable count: θ_d has d − m entries and λ has m (m = number of adapted tensors),
as the paper writes θ^{d−m}. The released PyTorch ports differ by one: Aghajanyan's code subtracts m (the model's
parameter-tensor count), later ports (T-Few's; per our method spec also Compacter's) subtract m + 1 (d − 1 in total).
Reference code: Aghajanyan et al.'s ``IntrinsicDimensionLight(said=True)`` as ported in
https://github.com/rabeehk/compacter (``seq2seq/projections/intrinsic.py``; T5-base, d = 20000, lr 3e-2).
Deviations: those of ``intrinsic`` (adapted weights only, biases and LayerNorms frozen; see its docstring).
Training: pass the paper's high learning rate in a compare spec, e.g. ``"said:dim=1000,lr=3e-2"``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from .intrinsic import Intrinsic, IntrinsicDelta


@ADAPTERS.register("said", paper="https://arxiv.org/abs/2012.13255", status="partial",
                   note="weights of adapted layers only (biases/LayerNorms frozen); budget d = (d − m) θ_d + m λ; "
                        "the paper trains with high lr (pass lr=3e-2)")
@dataclass(frozen=True, kw_only=True)
class SAID(Intrinsic):
    """SAID hyperparameters: total budget ``dim`` (θ_d gets dim − m, λ gets m), ``projection``, ``seed``."""

    def theta_size(self, m: int) -> int:
        if self.dim <= m:
            raise SubspacesError(f"said dim={self.dim} must exceed the number of adapted tensors m = {m} "
                                 "(θ_d has dim − m entries, λ has m)")
        return self.dim - m

    def add_shared(self, owner: IntrinsicDelta, m: int) -> None:
        owner.said_lambda = nn.Parameter(torch.ones(m, device=owner.device, dtype=owner.dtype))
