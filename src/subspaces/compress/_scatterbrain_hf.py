"""Scatterbrain (``scatterbrain.py``) as a drop-in attention for Hugging Face models, and its error report.

transformers 5.x dispatches every attention layer through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
and builds the mask through ``ALL_MASK_ATTENTION_FUNCTIONS`` under the same key. ``scatterbrain_`` registers both
under ``"scatterbrain"``: the mask function keeps only the (batch, n_k) padding mask (no n × n mask is built), the
attention function reads the layer's settings (``module._scatterbrain``) and the layer's own ``is_causal``, repeats
grouped key/value heads, and returns ``(batch, n, heads, d)`` like the built-in ones. Any layer whose class calls
``ALL_ATTENTION_FUNCTIONS`` is switched (LLaMA, BERT and the many models written the same way).
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from . import _calibrate

NAME = "scatterbrain"
ATTR = "_scatterbrain"
_USES_INTERFACE: dict[type, bool] = {}


@dataclasses.dataclass
class _Settings:
    name: str
    nb_features: int
    n_hashes: int
    bucket_size: int
    generator: torch.Generator
    mode: str = "approx"  # "approx" | "exact" (reference attention) | "probe" (approx, and accumulate the error)
    err: list = dataclasses.field(default_factory=lambda: [0.0, 0.0])  # Σ‖o − o*‖², Σ‖o*‖²

    def __deepcopy__(self, memo: dict) -> _Settings:
        """A copied model gets its own generator in the same state, shared by its layers like the original's."""
        gen = memo.get(id(self.generator))
        if gen is None:
            gen = memo[id(self.generator)] = torch.Generator(self.generator.device)
            gen.set_state(self.generator.get_state())
        return dataclasses.replace(self, generator=gen, err=list(self.err))


def _uses_interface(cls: type) -> bool:
    if cls not in _USES_INTERFACE:
        try:
            _USES_INTERFACE[cls] = "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
        except (OSError, TypeError):
            _USES_INTERFACE[cls] = False
    return _USES_INTERFACE[cls]


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The modules whose forward dispatches through transformers' attention interface."""
    return {n: m for n, m in model.named_modules() if _uses_interface(type(m))}


def _mask(batch_size: int, q_length: int, kv_length: int, q_offset: Any = 0, kv_offset: int = 0,
          mask_function: Any = None, attention_mask: Tensor | None = None, **kw: Any) -> Tensor | None:
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    if mask_function not in (causal_mask_function, bidirectional_mask_function):
        raise SubspacesError("scatterbrain supports plain causal or bidirectional attention with a padding mask; "
                             "this model asked for another mask (packed sequences, sliding window or an overlay)")
    if mask_function is causal_mask_function and int(q_offset) + q_length != kv_offset + kv_length:
        raise SubspacesError("scatterbrain: the keys must end at the last query (a DynamicCache or no cache); "
                             "static or sliding caches are not supported")
    if attention_mask is None:
        return None
    m = attention_mask.to(torch.bool)
    if (short := kv_offset + kv_length - m.shape[-1]) > 0:
        m = torch.cat([m, m.new_zeros(m.shape[0], short)], -1)
    m = m[:, kv_offset:kv_offset + kv_length]
    return None if bool(m.all()) else m


def _valid(mask: Tensor | None, nq: int, nk: int, causal: bool, device: torch.device) -> Tensor:
    valid = torch.ones(1, 1, nq, nk, dtype=torch.bool, device=device)
    if mask is not None:
        valid = valid & mask[:, None, None, :]
    if causal:
        valid = valid & (torch.arange(nk, device=device) <= torch.arange(nq, device=device)[:, None] + nk - nq)
    return valid


def _exact(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool, scale: float) -> Tensor:
    """Reference softmax attention (dense, for measurement); rows with no valid key give 0."""
    w = torch.promote_types(q.dtype, torch.float32)
    valid = _valid(mask, q.shape[-2], k.shape[-2], causal, q.device)
    s = (q.to(w) @ k.to(w).transpose(-1, -2) * scale).masked_fill(~valid, -math.inf)
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v.to(w)).to(q.dtype)


def _attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
               scaling: float | None = None, dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    from .scatterbrain import scatterbrain_attention

    st: _Settings | None = getattr(module, ATTR, None)
    if st is None:
        raise SubspacesError(f"{type(module).__name__} runs attention implementation 'scatterbrain' but was not "
                             "set up: call subspaces.compress.scatterbrain_(model, ...)")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise SubspacesError(f"scatterbrain got a precomputed {attention_mask.dim()}-D attention mask; give the "
                             "model a 2-D padding mask (attention_mask of shape (batch, n)) instead")
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", False)) if causal is None else bool(causal)
    if (g := query.shape[1] // key.shape[1]) > 1:  # grouped-query attention: share each key/value head
        key, value = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if st.mode == "exact":
        out = _exact(query, key, value, attention_mask, causal, scale)
    else:
        out, _ = scatterbrain_attention(query, key, value, nb_features=st.nb_features, n_hashes=st.n_hashes,
                                        bucket_size=st.bucket_size, causal=causal, key_padding_mask=attention_mask,
                                        scale=scale, generator=st.generator)
        if st.mode == "probe":
            ref = _exact(query, key, value, attention_mask, causal, scale)
            _accumulate(st, out, ref, attention_mask, causal, key.shape[-2])
    return out.transpose(1, 2).contiguous(), None


def _accumulate(st: _Settings, out: Tensor, ref: Tensor, mask: Tensor | None, causal: bool, nk: int) -> None:
    """Add this call's Σ‖o − o*‖² and Σ‖o*‖² over the query rows that count (some valid key, not padding)."""
    nq = out.shape[-2]
    rows = _valid(mask, nq, nk, causal, out.device).any(-1)
    if mask is not None and nk == nq:  # self-attention: padded query tokens do not count
        rows = rows & mask[:, None, :]
    rows = rows.unsqueeze(-1)
    st.err[0] += float(((out.double() - ref.double()) * rows).square().sum())
    st.err[1] += float((ref.double() * rows).square().sum())


def scatterbrain_(model: nn.Module, *, nb_features: int, n_hashes: int, bucket_size: int, seed: int = 0) -> nn.Module:
    """Switch every attention layer of a Hugging Face ``model`` to Scatterbrain attention, in place.

    Features and hash directions are redrawn at every forward from one generator seeded with ``seed``.
    Returns the model.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from .scatterbrain import Scatterbrain

    Scatterbrain(nb_features=nb_features, n_hashes=n_hashes, bucket_size=bucket_size, seed=seed)  # validates
    if not hasattr(model, "set_attn_implementation"):
        raise SubspacesError(f"scatterbrain_ needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    layers = attention_layers(model)
    if not layers:
        raise SubspacesError(f"{type(model).__name__} has no attention layer that dispatches through transformers' "
                             "ALL_ATTENTION_FUNCTIONS: scatterbrain cannot be installed")
    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    gen = torch.Generator().manual_seed(seed)
    for name, m in layers.items():
        setattr(m, ATTR, _Settings(name, nb_features, n_hashes, bucket_size, gen))
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        raise SubspacesError(f"{type(model).__name__} cannot switch its attention implementation to {NAME!r}")
    return model


def _settings(model: nn.Module) -> dict[str, _Settings]:
    found = {n: getattr(m, ATTR) for n, m in model.named_modules() if isinstance(getattr(m, ATTR, None), _Settings)}
    if not found:
        raise SubspacesError("the model has no scatterbrain attention: call scatterbrain_(model, ...) first")
    return found


@contextlib.contextmanager
def _mode(settings: Iterable[_Settings], mode: str):
    settings = list(settings)
    for st in settings:
        st.mode = mode
    try:
        yield
    finally:
        for st in settings:
            st.mode = "approx"


def _inputs(model: nn.Module, batch: Any) -> dict[str, Any]:
    b = {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
    if "labels" not in b and type(model).__name__.endswith("ForCausalLM") and "input_ids" in b:
        labels = b["input_ids"].clone()
        if "attention_mask" in b:
            labels = labels.masked_fill(b["attention_mask"] == 0, -100)
        b["labels"] = labels
    return b


def _main(out: Any) -> Tensor:
    for key in ("logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


@torch.no_grad()
def attention_error(model: nn.Module, batches: Iterable[Any]) -> dict[str, Any]:
    """Measure a Scatterbrain model against exact attention on ``batches`` (tensors of ids or dicts of inputs).

    Per attention layer, ``output_error`` = (Σ‖o − o*‖² / Σ‖o*‖²)^½ of the attention output (before the output
    projection), o* being exact softmax attention of the same q, k, v (the layer's inputs in the Scatterbrain
    model); padded query tokens are left out. End to end: the loss with exact and with Scatterbrain attention
    (causal LMs get ``labels = input_ids``), perplexities for causal LMs, and the relative error of the logits.
    """
    settings = _settings(model)
    batches = _calibrate.check_batches(batches)
    was_training = model.training
    model.eval()
    for st in settings.values():
        st.err = [0.0, 0.0]
    losses: list[tuple[float, float]] = []
    diff = ref = 0.0
    try:
        for batch in batches:
            inputs = _inputs(model, batch)
            with _mode(settings.values(), "exact"):
                exact = _calibrate.call(model, inputs)
            with _mode(settings.values(), "probe"):
                approx = _calibrate.call(model, inputs)
            e, a = _main(exact).double(), _main(approx).double()
            if "attention_mask" in inputs and e.dim() >= 3 and e.shape[1] == inputs["attention_mask"].shape[-1]:
                keep = inputs["attention_mask"].to(e.device).bool()[..., None]
                e, a = e * keep, a * keep
            diff += float((a - e).square().sum())
            ref += float(e.square().sum())
            if getattr(exact, "loss", None) is not None:
                losses.append((float(exact.loss), float(approx.loss)))
    finally:
        model.train(was_training)
    report: dict[str, Any] = {
        "layers": [{"name": n, "output_error": math.sqrt(st.err[0] / max(st.err[1], 1e-300))}
                   for n, st in settings.items()],
        "logits_error": math.sqrt(diff / max(ref, 1e-300)),
    }
    if losses:
        le, la = (sum(x) / len(losses) for x in zip(*losses))
        report.update(loss_exact=le, loss=la, loss_change=la - le)
        if type(model).__name__.endswith("ForCausalLM"):
            report.update(perplexity_exact=math.exp(le), perplexity=math.exp(la))
    return report


