"""LoRA: Low-Rank Adaptation of Large Language Models (Hu et al., 2021). https://arxiv.org/abs/2106.09685

Update rule: y = W0 x + b + s · B A dropout(x), with A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, s = α/r (rsLoRA: α/√r,
https://arxiv.org/abs/2312.03732). Official code: https://github.com/microsoft/LoRA; layout and defaults follow
Hugging Face PEFT (``lora_A``/``lora_B``, kaiming-uniform A, B = 0; Embedding: A = 0, B ~ N(0, 1); Conv: A is a
conv with the base kernel, B a 1×1 conv) so adapters convert to PEFT's format by renaming keys.

``init="pissa"`` (PiSSA, Meng et al., 2024, https://arxiv.org/abs/2404.02948): A, B start from the principal
singular vectors and values of W (s·B A = U_r S_r V_rᵀ) and the residual W - U_r S_r V_rᵀ stays in the base
layer; ``unadapt_`` restores W and the PEFT export is PEFT's own conversion to a plain rank-2r LoRA.

Deviation from the paper: none in the math. Layers: nn.Linear, nn.Conv1d, nn.Conv2d (groups=1),
nn.Embedding and transformers' GPT-2 Conv1D (weight stored (d_in, d_out), as PEFT's fan_in_fan_out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._errors import SubspacesError
from .._registry import ADAPTERS
from ._core import AdapterConfig, Delta, master_dtype, validate_common

_INITS = ("kaiming", "gaussian", "pissa")


def _kind(layer: nn.Module) -> str:
    if isinstance(layer, nn.Linear):
        return "linear"
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return "conv1d_t"  # transformers GPT-2 Conv1D: weight (d_in, d_out)
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise SubspacesError("lora supports Conv layers with groups=1 and padding_mode='zeros'")
        return "conv"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    raise SubspacesError(f"lora cannot adapt a {type(layer).__name__}; supported: Linear, Conv1d, Conv2d, "
                         "Embedding, transformers Conv1D")


def _dims(layer: nn.Module, kind: str) -> tuple[int, int]:
    """(d_in, d_out) of the matrix LoRA factorizes."""
    w = layer.weight
    if kind == "linear":
        return w.shape[1], w.shape[0]
    if kind == "conv1d_t":
        return w.shape[0], w.shape[1]
    if kind == "conv":
        return w[0].numel(), w.shape[0]
    return w.shape[0], w.shape[1]  # embedding: A (r, V), B (D, r)


@ADAPTERS.register("lora", paper="https://arxiv.org/abs/2106.09685")
@dataclass(frozen=True, kw_only=True)
class LoRA(AdapterConfig):
    """LoRA hyperparameters (PEFT's defaults: rank 8, alpha 8, no dropout)."""

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: str = "kaiming"

    def __post_init__(self) -> None:
        validate_common(self)
        if self.init not in _INITS:
            raise SubspacesError(f"lora init={self.init!r}: allowed {', '.join(_INITS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def num_trainable(self, layer: nn.Module) -> int:
        d_in, d_out = _dims(layer, _kind(layer))
        return self.rank * (d_in + d_out)

    def build(self, layer: nn.Module, *, init: bool = True) -> LoRADelta:
        kind = _kind(layer)
        d_in, d_out = _dims(layer, kind)
        # A fresh LoRA of rank >= min(d_in, d_out) costs more than full fine-tuning of the layer; an imported one
        # (init=False: PEFT allows it, and an exact export of a full-rank update needs it) is taken as is.
        if self.rank >= min(d_in, d_out) + (0 if init else 1):
            raise SubspacesError(f"lora rank={self.rank} must be < min(d_in, d_out) = {min(d_in, d_out)} "
                                 f"for this {type(layer).__name__} ({d_in} -> {d_out})")
        if self.init == "pissa" and kind not in ("linear", "conv1d_t"):
            raise SubspacesError("lora init='pissa' supports Linear layers only")
        delta = LoRADelta(layer, kind, self)
        if init:
            delta.reset(layer)
        return delta


class LoRADelta(Delta):
    def __init__(self, layer: nn.Module, kind: str, config: LoRA) -> None:
        super().__init__()
        w = layer.weight
        dtype = master_dtype(w)
        kw = dict(device=w.device, dtype=dtype)
        r = config.rank
        self.kind, self.scaling = kind, config.scaling
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else None
        if kind == "conv":
            k = tuple(w.shape[2:])
            self.A = nn.Parameter(torch.zeros(r, w.shape[1], *k, **kw))
            self.B = nn.Parameter(torch.zeros(w.shape[0], r, *(1,) * len(k), **kw))
            self.conv = F.conv1d if len(k) == 1 else F.conv2d
            self.conv_args = (layer.stride, layer.padding, layer.dilation)
        else:
            d_in, d_out = _dims(layer, kind)
            self.A = nn.Parameter(torch.zeros(r, d_in, **kw))
            self.B = nn.Parameter(torch.zeros(d_out, r, **kw))
        if kind == "embedding":
            self.emb_args = (layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
                             layer.sparse)
        if config.init == "pissa":
            self.register_buffer("A0", torch.zeros_like(self.A))
            self.register_buffer("B0", torch.zeros_like(self.B))
        self.init = config.init

    @torch.no_grad()
    def reset(self, layer: nn.Module) -> None:
        if self.kind == "embedding":
            nn.init.zeros_(self.A)
            nn.init.normal_(self.B)
        elif self.init == "pissa":
            from ..linalg import truncated_svd

            w = layer.weight.float()
            U, S, Vh = truncated_svd(w.T if self.kind == "conv1d_t" else w, self.A.shape[0])
            root = (S / self.scaling).sqrt()
            self.A.copy_(root[:, None] * Vh)
            self.B.copy_(U * root)
            self.A0.copy_(self.A)
            self.B0.copy_(self.B)
        else:
            if self.init == "gaussian":
                nn.init.normal_(self.A, std=1 / self.A.shape[0])
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
            nn.init.zeros_(self.B)

    def _matrix(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return (B.flatten(1) @ A.flatten(1)).view(B.shape[0], *A.shape[1:]) * self.scaling
        dw = (B @ A) * self.scaling  # (d_out, d_in)
        return dw.T if self.kind in ("conv1d_t", "embedding") else dw

    def weight(self) -> torch.Tensor:
        return self._matrix(self.A, self.B)

    def offset(self) -> torch.Tensor | None:
        return self._matrix(self.A0, self.B0) if self.init == "pissa" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "embedding":
            return F.embedding(x, self.A.T, *self.emb_args) @ self.B.T * self.scaling
        x = x.to(self.A.dtype)
        x = self.drop(x) if self.drop is not None else x
        if self.kind == "conv":
            return self.conv(self.conv(x, self.A, None, *self.conv_args), self.B) * self.scaling
        return F.linear(F.linear(x, self.A), self.B) * self.scaling

    def add_to(self, output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.kind not in ("linear", "conv1d_t"):
            return super().add_to(output, x)
        # The branch runs in the activations' dtype (fp32 master factors are cast, not the layer input), so a
        # bf16 model keeps no fp32 copy of each adapted layer's input for the backward pass.
        dt = output.dtype
        A, B = (self.A, self.B) if self.A.dtype == dt else (self.A.to(dt), self.B.to(dt))
        if x.dtype != dt:
            x = x.to(dt)
        h = F.linear(x if self.drop is None else self.drop(x), A)
        if output.is_contiguous():
            # One fused kernel for out + s·h Bᵀ: no (…, d_out) temporary for the branch.
            out2 = torch.addmm(output.reshape(-1, output.shape[-1]), h.reshape(-1, h.shape[-1]), B.T,
                               alpha=self.scaling)
            return out2.view(output.shape)
        return output + F.linear(h, B) * self.scaling
