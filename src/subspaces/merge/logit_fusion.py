"""Dynamic logit fusion: small experts' logit offsets fused into a large causal LM at every decoding step.

Fan et al., "On Giant's Shoulders: Effortless Weak to Strong by Dynamic Logits Fusion", NeurIPS 2024,
https://arxiv.org/abs/2406.15480; code: https://github.com/Facico/Dynamic-Logit-Fusion (a README only). Per step and
sequence (z_L large model's logits, z_t expert t, z⁰_t its untuned small base; P, Q their softmaxes):
    z̃ = z_L + Σ_t α_t (z_t − z⁰_t),   α* = argmin_α Σ_t (KL(P̃‖P_L) − KL(Q_t‖Q⁰_t))² + (KL(P_L‖P̃) − KL(Q⁰_t‖Q_t))²
(Eq. 3/6, Alg. 1: L moves, in forward and reverse KL, as far as fine-tuning moved S). Fixed α is proxy tuning.
Choices: the paper's grid α ∈ {0, step, …, max_weight} (0.1 on [0, 2]); several experts: ``search="one"`` is Alg. 1
(one expert active per step, T·n candidates), ``"grid"`` the exact product-grid minimiser (n^T). Ties → the first
candidate (α = 0 when nothing moves). Deviations: our spec's second term KL(P̃‖Q_t) ≈ KL(P_L‖Q) is not the paper's
(we follow Eq. 3); each expert may bring its own untuned base (the paper shares one; a shared model runs once a step);
KL terms and fused logits are float32 whatever the models' dtype; decoding is greedy or temperature sampling only.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError
from .._registry import MERGE


@dataclass(frozen=True, kw_only=True)
class LogitFusionConfig:
    """``weights``: None solves α per step (the paper); a number, or one per expert, fixes α (proxy tuning).
    ``max_weight``/``step``: the grid {0, step, …, max_weight}. ``search``: "one" (Alg. 1) or "grid"."""

    weights: float | tuple[float, ...] | None = None
    max_weight: float = 2.0
    step: float = 0.1
    search: str = "one"

    def __post_init__(self) -> None:
        w = self.weights if self.weights is None or isinstance(self.weights, (list, tuple)) else (self.weights,)
        m, s = self.max_weight, self.step
        for name, ok, allowed in (("max_weight", _finite(m) and m > 0, "a finite number > 0"),
                                  ("step", _finite(s) and _finite(m) and 0 < s <= m, "a number in (0, max_weight]"),
                                  ("search", self.search in ("one", "grid"), "'one' or 'grid'"),
                                  ("weights", w is None or (w and all(map(_finite, w))),
                                   "None (solve per step), a number or one number per expert")):
            if not ok:
                raise SubspacesError(f"logit_fusion: {name}={getattr(self, name)!r}; allowed: {allowed}")
        object.__setattr__(self, "weights", w and tuple(float(v) for v in w))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _work(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _kl(logp: Tensor, logq: Tensor) -> Tensor:  # KL(p‖q) on the last axis; 0·log 0 = 0 for masked (−inf) tokens
    return torch.where(logp.isneginf(), 0.0, logp.exp() * (logp - logq)).sum(-1)


def _delta(z_tuned: Tensor, z_base: Tensor) -> Tensor:  # nan: −inf − −inf on a token both small models mask
    return torch.nan_to_num(_work(z_tuned) - _work(z_base), nan=0.0)


def fuse_logits(z_large: Tensor, z_tuned: Tensor, z_base: Tensor, weights: Tensor) -> Tensor:
    """z̃ = z_L + Σ_t w_t (z_t − z⁰_t). z_large [B, V]; z_tuned, z_base [B, T, V]; weights [T] or [B, T]."""
    return _work(z_large) + (weights.to(_work(z_large))[..., None] * _delta(z_tuned, z_base)).sum(-2)


def fusion_objective(z_large: Tensor, z_tuned: Tensor, z_base: Tensor, weights: Tensor) -> Tensor:
    """The paper's per-step loss [B, C] for candidate weights [C, T] (or [B, C, T]); shapes as in ``fuse_logits``."""
    delta = _delta(z_tuned, z_base)
    lp, lq_t, lq = _work(z_large).log_softmax(-1), _work(z_tuned).log_softmax(-1), _work(z_base).log_softmax(-1)
    d_fwd, d_rev = _kl(lq_t, lq), _kl(lq, lq_t)  # [B, T]: how far fine-tuning moved each small model
    w = weights.to(delta).expand(len(delta), *weights.shape[-2:])
    lpt = (lp[:, None] + torch.einsum("bct,btv->bcv", w, delta)).log_softmax(-1)  # [B, C, V]
    f, r = _kl(lpt, lp[:, None]), _kl(lp[:, None], lpt)
    return ((f[..., None] - d_fwd[:, None]) ** 2 + (r[..., None] - d_rev[:, None]) ** 2).sum(-1)


def fusion_weights(z_large: Tensor, z_tuned: Tensor, z_base: Tensor, *, max_weight: float = 2.0, step: float = 0.1,
                   search: str = "one", chunk: int = 64) -> Tensor:
    """α* [B, T]: the grid candidate of least ``fusion_objective`` per sequence (the first on ties: deterministic).
    Candidates: one expert active at a time (``search="one"``, Alg. 1) or the whole product grid (``"grid"``)."""
    n_exp, grid = z_tuned.shape[1], torch.linspace(0.0, max_weight, round(max_weight / step) + 1, dtype=torch.float64)
    if search == "one" or n_exp == 1:
        cand = torch.block_diag(*[grid[:, None]] * n_exp)
    elif len(grid) ** n_exp > 2**14:
        raise SubspacesError(f"logit_fusion: search='grid' is {len(grid)}^{n_exp} > 2^14 candidates; use 'one'")
    else:
        cand = torch.cartesian_prod(*[grid] * n_exp).reshape(-1, n_exp)
    cand = cand.to(z_large.device, _work(z_large).dtype)
    loss = torch.cat([fusion_objective(z_large, z_tuned, z_base, c) for c in cand.split(chunk)], dim=1)
    return cand[loss.argmin(dim=1)]


def _as_lm(x: Any) -> nn.Module:
    if isinstance(x, (str, Path)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(x), use_safetensors=True).eval()
    if not isinstance(x, nn.Module):
        raise SubspacesError(f"logit_fusion: a model is an nn.Module or a Hugging Face folder, not {type(x).__name__}")
    return x


@MERGE.register("logit_fusion", paper="https://arxiv.org/abs/2406.15480", status="complete",
                note="inference-time: returns a LogitFusion decoder, writes nothing")
class LogitFusion:
    """``LogitFusion(large, experts=[(tuned, untuned), ...], **hp)`` (hp: ``LogitFusionConfig``): Hugging Face causal
    LMs (modules or folders) sharing one vocabulary. ``logits(ids)``/``__call__``: fused next-token logits [B, V];
    ``generate``: decoding with a KV cache per model. Each step's weights [B, T] go to ``history``."""

    kind = "inference"

    def __init__(self, large: Any, experts: Sequence[tuple[Any, Any]], **hp: Any) -> None:
        if unknown := sorted(set(hp) - {f.name for f in fields(LogitFusionConfig)}):
            valid = ", ".join(f.name for f in fields(LogitFusionConfig))
            raise SubspacesError(f"logit_fusion: unknown hyperparameter {unknown[0]!r}; valid: {valid}")
        self.config = LogitFusionConfig(**hp)
        pairs = [tuple(p) if isinstance(p, (list, tuple)) else (p,) for p in experts]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise SubspacesError("logit_fusion: models must be a non-empty list of (tuned, untuned) small-model pairs")
        if self.config.weights is not None and len(self.config.weights) not in (1, len(pairs)):
            raise SubspacesError(f"logit_fusion: {len(self.config.weights)} weights for {len(pairs)} experts")
        key = lambda x: str(Path(x).resolve()) if isinstance(x, (str, Path)) else id(x)  # noqa: E731
        distinct = {key(x): x for x in (large, *(m for p in pairs for m in p))}  # a shared base runs once per step
        slots = {k: i for i, k in enumerate(distinct)}  # insertion order: the large model is slot 0
        self.models: list[nn.Module] = [_as_lm(x) for x in distinct.values()]
        self.pairs = [(slots[key(t)], slots[key(b)]) for t, b in pairs]
        sizes = [getattr(m.get_output_embeddings(), "out_features", None) or m.config.vocab_size for m in self.models]
        if len(set(sizes)) > 1:
            raise SubspacesError(f"logit_fusion: the models' vocabularies differ (output sizes {sizes}, large model "
                                 "first); all models must share one tokenizer and vocabulary")
        self._cache_kw = ["cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"
                          for m in self.models]  # transformers ≥ 5 renamed past_key_values to cache
        self.history: list[Tensor] = []

    @classmethod
    def run(cls, *, base: Any, models: Sequence[tuple[Any, Any]], out: Any = None, **hp: Any) -> LogitFusion:
        """``ss.merge("logit_fusion", base=large, models=[(tuned, untuned), ...])`` → a ``LogitFusion``."""
        if out is not None:
            raise SubspacesError(f"logit_fusion is an inference-time method with no merged weights to save: out must "
                                 f"be None (got out={out!r}); use the returned LogitFusion's generate()")
        return cls(base, models, **hp)

    def _step(self, ids: Tensor, mask: Tensor, caches: list[Any] | None) -> tuple[Tensor, list[Any]]:
        """Fused logits after ``ids`` (only the new tokens when ``caches`` holds the models' caches) and new caches."""
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]  # left padding: positions skip the pads
        outs, new = [], []
        for m, kw, cache in zip(self.models, self._cache_kw, caches or [None] * len(self.models)):
            dev = next(m.parameters()).device
            o = m(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                  use_cache=caches is not None, **{kw: cache})
            outs.append(o.logits[:, -1])
            new.append(o["cache"] if "cache" in o else o.get("past_key_values"))
        z_l, c = outs[0], self.config
        z_t = torch.stack([outs[t].to(z_l.device) for t, _ in self.pairs], 1)
        z_b = torch.stack([outs[b].to(z_l.device) for _, b in self.pairs], 1)
        if c.weights is None:
            w = fusion_weights(z_l, z_t, z_b, max_weight=c.max_weight, step=c.step, search=c.search)
        else:
            w = torch.tensor(c.weights, device=z_l.device).expand(len(z_l), len(self.pairs))
        self.history.append(w)
        return fuse_logits(z_l, z_t, z_b, w), new

    @torch.no_grad()
    def logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Fused next-token logits [B, V] (float32) after the prefixes ``input_ids`` [B, S]."""
        return self._step(input_ids, torch.ones_like(input_ids) if attention_mask is None else attention_mask, None)[0]

    __call__ = logits

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, *, attention_mask: Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None, use_cache: bool = True) -> Tensor:
        """Greedy (or temperature-sampled) decoding from P̃; returns [B, S + new]. Finished rows repeat ``eos``."""
        if not temperature > 0:
            raise SubspacesError(f"logit_fusion: temperature={temperature!r}; must be > 0")
        ids, feed, caches, self.history = input_ids, input_ids, [None] * len(self.models), []
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.device)
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            z, caches = self._step(feed, mask, caches) if use_cache else self._step(ids, mask, None)
            tok = (torch.multinomial((z / temperature).softmax(-1), 1, generator=generator)[:, 0] if do_sample
                   else z.argmax(-1)).to(ids.device)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done |= tok == eos_token_id
            ids, feed = torch.cat([ids, tok[:, None]], 1), tok[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            if bool(done.all()):
                break
        return ids
