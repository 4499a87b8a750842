"""Losses and measurements for the MatryoshkaKV patch (``_kv_attention``): language-model cross-entropy, the
distillation KL, per-layer attention-output error of the projections, perplexity."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._calibrate import Batch, call
from ._kv_attention import NAME, _pre_hook, disabled


def split(batch: Batch) -> tuple[dict[str, Any], Tensor, Tensor | None]:
    """Model inputs (without labels), labels (``input_ids`` if none, padding → −100) and the attention mask."""
    inputs = {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
    labels = inputs.pop("labels", None)
    mask = inputs.get("attention_mask")
    if labels is None:
        labels = inputs["input_ids"] if mask is None else inputs["input_ids"].masked_fill(mask == 0, -100)
    return inputs, labels, mask


def logits(model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    return call(model, inputs, use_cache=False).logits.float()


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over the labelled tokens."""
    labels = labels.to(logits.device)[:, 1:]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100)


def kl(teacher: Tensor, student: Tensor, mask: Tensor | None) -> Tensor:
    """KL(teacher ‖ student) at temperature 1, summed over the vocabulary, mean over (unpadded) tokens."""
    t, s = teacher.log_softmax(-1), student.log_softmax(-1)
    per_token = (t.exp() * (t - s)).sum(-1)
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.device, per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[Batch]) -> float:
    """exp of the token-weighted mean next-token cross-entropy over ``batches`` (with the current projections)."""
    total, count = 0.0, 0
    for batch in batches:
        inputs, labels, _ = split(batch)
        n = int((labels[:, 1:] != -100).sum())
        total += float(cross_entropy(logits(model, inputs), labels)) * n
        count += n
    return math.exp(total / max(count, 1))


@torch.no_grad()
def attention_errors(model: nn.Module, batches: Sequence[Batch]) -> tuple[list[float], float]:
    """Relative error ‖o' − o‖/‖o‖ of every projected attention module's output, each layer on the *uncompressed*
    model's inputs (one pass: the hook reruns the module with its projections on), and over all layers."""
    modules = [m for m in model.modules() if NAME in m._modules]
    num, den = [0.0] * len(modules), [0.0] * len(modules)

    def hook(i: int):
        def fn(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            state = module._modules[NAME]
            state.enabled = True
            try:
                key = "cache" if "cache" in kwargs else "past_key_values"
                a, kw = _pre_hook(module, args, {**kwargs, key: None})
                out = module.forward(*a, **kw)[0].double()
            finally:
                state.enabled = False
            ref = output[0].double()
            num[i] += float((out - ref).square().sum())
            den[i] += float(ref.square().sum())
        return fn

    handles = [m.register_forward_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    was_training = model.training
    model.eval()
    try:
        with disabled(model):
            for batch in batches:
                call(model, split(batch)[0], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    per = [math.sqrt(n / max(d, 1e-300)) for n, d in zip(num, den)]
    return per, math.sqrt(sum(num) / max(sum(den), 1e-300))


def cache_bytes_per_token(model: nn.Module) -> tuple[int, int]:
    """Bytes the KV cache stores per token (all layers, K and V) with the current ranks, and without compression
    (keys and values are cached in the dtype of ``k_proj``'s output)."""
    kept = full = 0
    for m in model.modules():
        if NAME in m._modules:
            s, size = m._modules[NAME], m.k_proj.weight.element_size()
            kept += int(s.r_k.sum() + s.r_v.sum()) * size
            full += 2 * s.heads * s.head_dim * size
    return kept, full
