"""Calibration statistics, collected layer by layer with hooks, streaming over batches, in float64.

Per targeted Linear (``LayerStats``): the input sums ``Σ x``, ``Σ |x|`` and second moment ``Σ x xᵀ`` ("inputs"), the output
sum and second moment ("outputs"), and the empirical Fisher summed along each weight axis ("fisher", squared
mini-batch gradients of the loss). Nothing per token is kept.

``run_sequential`` is the block-by-block runner of SVD-LLM / EoRA / GPTQ: the inputs of the first transformer block
are captured once per batch; then for each block the statistics of its targeted layers are collected from the
*already processed* earlier blocks' outputs, the block's layers are replaced (``process``), and the processed block
is replayed to give the next block its inputs. Peak memory: the model, the captured hidden states and one block's
accumulators. Without a block list (or for targeted layers outside the blocks) one whole-model pass collects the
rest.

Padding tokens are counted like any other token: give unpadded (packed) batches.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._errors import SubspacesError

KINDS = ("inputs", "outputs", "fisher")
Batch = Tensor | dict[str, Any]


@dataclass
class LayerStats:
    """Streaming sums for one Linear of shape (out, in). Moments are float64 on the layer's device."""

    tokens: int = 0
    x_sum: Tensor | None = None       # (in,)
    x_abs_sum: Tensor | None = None   # (in,)  Σ |x| (ASVD's activation scale)
    xxt: Tensor | None = None         # (in, in)  Σ x xᵀ
    y_sum: Tensor | None = None       # (out,)
    yyt: Tensor | None = None         # (out, out)  Σ y yᵀ
    fisher_in: Tensor | None = None   # (in,)  Σ_batches Σ_out (∂L/∂W)²
    fisher_out: Tensor | None = None  # (out,)
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def _need(self, what: Tensor | None, kind: str) -> Tensor:
        if what is None or (kind != "fisher" and self.tokens == 0):
            raise SubspacesError(f"no {kind!r} calibration statistics were collected for this layer")
        return what

    def input_moment(self) -> Tensor:
        """E[x xᵀ] (in, in), float64."""
        return self._need(self.xxt, "inputs") / self.tokens

    def input_mean(self) -> Tensor:
        return self._need(self.x_sum, "inputs") / self.tokens

    def input_abs_mean(self) -> Tensor:
        """E|x| per input channel (in,), float64 (over all rows, also when a sampler thins the moments)."""
        return self._need(self.x_abs_sum, "inputs") / self.tokens

    def output_mean(self) -> Tensor:
        return self._need(self.y_sum, "outputs") / self.tokens

    def output_cov(self) -> Tensor:
        """Cov[y] = E[y yᵀ] − μ μᵀ (out, out), float64."""
        mu = self.output_mean()
        return self._need(self.yyt, "outputs") / self.tokens - torch.outer(mu, mu)

    def fisher(self, axis: str = "in") -> Tensor:
        """Row importance Î_i = Σ_j I_ij: per input feature (``"in"``) or per output feature (``"out"``)."""
        f = self.fisher_in if axis == "in" else self.fisher_out
        return self._need(f, "fisher") / max(self.batches, 1)

    def add_inputs(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.xxt is None:
            self.xxt = x.new_zeros(x.shape[1], x.shape[1])
            self.x_sum = x.new_zeros(x.shape[1])
            self.x_abs_sum = x.new_zeros(x.shape[1])
        self.xxt.addmm_(x.T, x)
        self.x_sum += x.sum(0)
        self.x_abs_sum += x.abs().sum(0)
        self.tokens += x.shape[0]

    def add_outputs(self, y: Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).to(torch.float64)
        if self.yyt is None:
            self.yyt = y.new_zeros(y.shape[1], y.shape[1])
            self.y_sum = y.new_zeros(y.shape[1])
        self.yyt.addmm_(y.T, y)
        self.y_sum += y.sum(0)


def _to(batch: Batch, device: torch.device) -> Batch:
    if isinstance(batch, Tensor):
        return batch.to(device)
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


def call(model: nn.Module, batch: Batch, **extra: Any) -> Any:
    batch = _to(batch, next(model.parameters()).device)
    if isinstance(batch, Tensor):
        return model(batch, **extra)
    return model(**batch, **extra)


def check_batches(calibration: Iterable[Batch] | None) -> list[Batch] | None:
    if calibration is None:
        return None
    batches = list(calibration)
    if not batches:
        raise SubspacesError("calibration is empty: give at least one batch")
    for b in batches:
        if not isinstance(b, (Tensor, dict)):
            raise SubspacesError(f"a calibration batch must be a tensor of input ids or a dict of model inputs, "
                                 f"got {type(b).__name__}")
    return batches


@contextlib.contextmanager
def _hooks(layers: dict[str, nn.Module], stats: dict[str, LayerStats], kinds: set[str]):
    def hook(name):
        def fn(module, args, output):
            if "inputs" in kinds:
                stats[name].add_inputs(args[0])
            if "outputs" in kinds:
                stats[name].add_outputs(output)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def fisher(model: nn.Module, layers: dict[str, nn.Module], batches: Sequence[Batch],
           loss_fn: Callable[[nn.Module, Batch], Tensor] | None = None) -> dict[str, LayerStats]:
    """Empirical Fisher of the targeted weights, summed along each axis: one forward/backward per batch.

    ``loss_fn(model, batch)`` defaults to ``model(**batch).loss``; a causal LM without ``labels`` in the batch is
    given ``labels = input_ids``. Only the targeted weights get gradients; the model's parameters are untouched.
    """
    stats = {n: LayerStats() for n in layers}
    flags = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for m in layers.values():
            m.weight.requires_grad_(True)
        for batch in batches:
            with torch.enable_grad():
                loss = loss_fn(model, batch) if loss_fn is not None else _default_loss(model, batch)
                grads = torch.autograd.grad(loss, [m.weight for m in layers.values()], allow_unused=True)
            for (name, m), g in zip(layers.items(), grads):
                if g is None:
                    continue
                g2 = g.detach().to(torch.float64).square()
                s = stats[name]
                s.fisher_in = g2.sum(0) if s.fisher_in is None else s.fisher_in + g2.sum(0)
                s.fisher_out = g2.sum(1) if s.fisher_out is None else s.fisher_out + g2.sum(1)
                s.batches += 1
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return stats


def _default_loss(model: nn.Module, batch: Batch) -> Tensor:
    if isinstance(batch, Tensor):
        batch = {"input_ids": batch}
    if "labels" not in batch:
        if not type(model).__name__.endswith("ForCausalLM"):
            raise SubspacesError("Fisher statistics need a loss: give batches with 'labels' or a loss_fn")
        batch = {**batch, "labels": batch["input_ids"]}
    out = call(model, batch)
    if getattr(out, "loss", None) is None:
        raise SubspacesError("the model returned no loss for a calibration batch: give 'labels' or a loss_fn")
    return out.loss


def find_blocks(model: nn.Module, names: Iterable[str]) -> tuple[str, nn.ModuleList] | None:
    """The ModuleList of repeated blocks holding the most targeted layers (``model.layers``, ``encoder.layer``)."""
    names = list(names)
    best, best_count = None, 0
    for prefix, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            count = sum(1 for n in names if n.startswith(prefix + "."))
            if count > best_count:
                best, best_count = (prefix, module), count
    return best


class _Captured(Exception):
    pass


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Batch]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first block's forward for every batch; the rest of the model is not run."""
    seen: list[tuple[tuple, dict]] = []

    def pre(module, args, kwargs):
        seen.append((args, dict(kwargs)))
        raise _Captured

    handle = block.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Captured):
                call(model, batch, use_cache=False) if _takes_use_cache(model) else call(model, batch)
    finally:
        handle.remove()
    if len(seen) != len(batches):
        raise SubspacesError("the model's first block was not called for every calibration batch")
    return seen


def _takes_use_cache(model: nn.Module) -> bool:
    return hasattr(getattr(model, "config", None), "use_cache")


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[Batch],
    kinds: set[str],
    process: Callable[[str, nn.Module, LayerStats], None],
    *,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    sampler: Any = None,
) -> None:
    """Collect ``kinds`` statistics for ``layers`` and call ``process(name, layer, stats)`` for each, block by
    block (see the module docstring). ``process`` may replace the layer in the model; later blocks then see the
    processed model; ``layers`` is emptied as they are processed (a replaced layer is not kept alive). ``kinds`` may
    be empty (``process`` then gets empty stats). ``sampler``
    (``compress.sampling.RowSampler``): input moments from a sampled subset of token rows (batches replayed twice)."""
    was_training = model.training
    model.eval()
    try:
        found = find_blocks(model, layers) if kinds else None
        if found is not None:
            prefix, blocks = found
            inputs = _capture_block_inputs(model, blocks[0], batches)
            for i in progress(range(len(blocks))):
                block = blocks[i]
                mine = {n: m for n, m in layers.items() if n.startswith(f"{prefix}.{i}.")}
                stats = {n: LayerStats() for n in mine}

                def replay(block=block, inputs=inputs):
                    for args, kwargs in inputs:
                        block(*args, **kwargs)

                _collect(mine, stats, kinds, sampler, replay)
                for n in list(mine):
                    process(n, mine.pop(n), stats.pop(n))
                    del layers[n]
                if i + 1 < len(blocks):
                    for j, (a, k) in enumerate(inputs):  # in place: one batch's old hidden states freed at a time
                        inputs[j] = _with_hidden(a, k, _first(block(*a, **k)))
        rest = dict(layers)
        if rest:
            stats = {n: LayerStats() for n in rest}
            if kinds:
                def replay_all():
                    for batch in batches:
                        call(model, batch)

                _collect(rest, stats, kinds, sampler, replay_all)
            for n in list(rest):
                process(n, rest.pop(n), stats.pop(n))
                del layers[n]
    finally:
        model.train(was_training)


def _collect(layers: dict[str, nn.Module], stats: dict[str, LayerStats], kinds: set[str], sampler: Any,
             replay: Callable[[], None]) -> None:
    """One hooked pass over the batches, or the sampler's two."""
    if sampler is not None:
        return sampler.collect(layers, stats, kinds, replay)
    with _hooks(layers, stats, kinds):
        replay()


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
