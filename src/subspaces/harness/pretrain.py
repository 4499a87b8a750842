"""Pretrain the tiny LLaMA from scratch on the offline corpus with one train method; loss curves; a comparison.

Data: the UTF-8 bytes of ``pydoc_corpus()`` (vocabulary 256); the last ``VAL_FRACTION`` is a fixed validation
tail, evaluated on the same evenly spaced windows every time; training draws random contiguous windows with a
generator seeded by ``seed``. Model: ``tiny_llama(seed=seed, **model_kwargs)``. Optimizer: ``"adamw"`` is
``torch.optim.AdamW`` over every parameter; any other name is a registered train method built by
``ss.optim.setup_`` (which may reparameterize the model first). Schedule (GaLore's recipe, transformers'
``get_cosine_with_min_lr_schedule_with_warmup``): linear warmup over ``warmup`` of the steps, cosine decay to 10%
of the peak, gradient clipping at 1.0.

Per-method defaults for this recipe live with each method (``TRAIN`` registry entries, ``defaults["pretrain"]``);
the rank of every low-rank method is a quarter of the hidden size (64 on the default hidden 256), the ratio of
GaLore's 60M model (r=128, d=512).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .._device import parse_dtype, resolve_device
from .._errors import SubspacesError, did_you_mean

BASELINE = "adamw"
BASELINE_LR = 1e-3  # best of 5e-4, 1e-3, 3e-3, 1e-2 on the default 300-step run
OTHER_LR = 3e-3  # a registered method without pretraining defaults of its own
RANK_DIVISOR = 4  # default rank = hidden_size // 4
ADAMW_KEYS = ("betas", "eps", "amsgrad")
COMPARE_METHODS = ("adamw", "galore", "dct", "random", "sltrain", "sst")
VAL_FRACTION = 0.1
MIN_LR = 0.1  # cosine decay to this fraction of the peak
TIMING_SKIP = 3  # first steps left out of the median time per step (allocator warm-up, first SVD)
FILES = ("results.json", "loss_curve.png", "results.md")


# ---------------------------------------------------------------------------------------------- validation
def available_methods() -> list[str]:
    from .. import optim  # noqa: F401  (importing registers the train methods)
    from .._registry import TRAIN

    return [BASELINE, *(e.name for e in TRAIN)]


def defaults(method: str) -> dict[str, Any]:
    """The learning rate and hyperparameters ``method`` pretrains with by default (its registry entry's)."""
    if method == BASELINE:
        return {"lr": BASELINE_LR}
    from .._registry import TRAIN

    return {"lr": OTHER_LR, **TRAIN.get(method).defaults.get("pretrain", {})}


def check_method(method: str) -> None:
    valid = available_methods()
    if method not in valid:
        raise SubspacesError(f"unknown pretraining method {method!r}." + did_you_mean(method, valid))


def resolve(method: str, hyperparameters: dict[str, Any] | None, lr: float | None,
            hidden_size: int, seed: int = 0) -> tuple[float, dict[str, Any], Any]:
    """(lr, effective hyperparameters, config or None for AdamW): the defaults merged with the user's values,
    validated without building anything. ``lr`` wins over ``hyperparameters["lr"]`` over the default."""
    check_method(method)
    user = dict(hyperparameters or {})
    hp = defaults(method)
    if method == BASELINE:
        unknown = sorted(set(user) - {"lr", *ADAMW_KEYS})
        if unknown:
            raise SubspacesError(f"adamw: unknown hyperparameter(s) {unknown}; allowed: {['lr', *ADAMW_KEYS]}")
    else:
        from .._registry import TRAIN

        fields = {f.name for f in dataclasses.fields(TRAIN.get(method).obj)}
        hp = {k: v for k, v in hp.items() if k == "lr" or k in fields}
        if "rank" in fields:
            hp["rank"] = max(1, hidden_size // RANK_DIVISOR)
        if "seed" in fields:  # random supports and samples follow the run's seed
            hp["seed"] = seed
    hp.update(user)
    given = hp.pop("lr") if lr is None else lr
    hp.pop("lr", None)
    try:
        lr = float(given)
    except (TypeError, ValueError):
        raise SubspacesError(f"lr={given!r}: must be a number > 0") from None
    if not math.isfinite(lr) or lr <= 0:
        raise SubspacesError(f"lr={lr!r}: must be a number > 0")
    if method == BASELINE:
        if "betas" in hp:
            hp["betas"] = tuple(hp["betas"])
        return lr, hp, None
    from ..optim import config_for

    try:
        config = config_for(method, **hp)
    except SubspacesError:
        raise
    except (TypeError, ValueError) as e:
        raise SubspacesError(f"{method}: {e}") from None
    return lr, hp, config


def _check_positive(**values: Any) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SubspacesError(f"{name}={v!r}: must be an integer >= 1")


def _check_out(out: Path | None, ours: tuple[str, ...] = FILES) -> None:
    """Fail before training, not after, when ``out`` holds someone else's files."""
    if out is None or not Path(out).exists():
        return
    out = Path(out)
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours) if out.is_dir() else [out.name]
    if foreign:
        raise SubspacesError(f"output {out} is not an empty folder (holds {', '.join(foreign[:5])}); "
                             "choose a new or empty one")


# ---------------------------------------------------------------------------------------------- data
def corpus_tokens() -> torch.Tensor:
    """The byte tokens (int64) of ``pydoc_corpus()``."""
    from ..data import pydoc_corpus

    return torch.frombuffer(bytearray(pydoc_corpus().encode("utf-8")), dtype=torch.uint8).long()


def split(tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    n_val = int(len(tokens) * VAL_FRACTION)
    train, val = tokens[:-n_val], tokens[-n_val:]
    if len(val) <= seq_len:
        raise SubspacesError(f"seq_len={seq_len}: longer than the validation split ({len(val)} tokens)")
    return train, val


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    return tokens[starts[:, None] + torch.arange(seq_len + 1)]  # (batch, seq_len + 1)


def _loss(model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=windows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def _evaluate(model: torch.nn.Module, val_batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = statistics.fmean(_loss(model, b).item() for b in val_batches)
    model.train()
    return loss


def schedule(opt: torch.optim.Optimizer, steps: int, warmup: float):
    """transformers' linear warmup over ``warmup`` of the steps, then cosine decay to ``MIN_LR`` of the peak."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=math.ceil(warmup * steps),
                                                       num_training_steps=steps, min_lr_rate=MIN_LR)


# ---------------------------------------------------------------------------------------------- one run
def pretrain(
    method: str = "adamw", *, steps: int = 300, batch_size: int = 16, seq_len: int = 128, lr: float | None = None,
    warmup: float = 0.1, weight_decay: float = 0.0, eval_every: int = 50, eval_batches: int = 8, seed: int = 0,
    hyperparameters: dict[str, Any] | None = None, model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device | None = None, dtype: str | torch.dtype | None = None, grad_clip: float | None = 1.0,
    out: str | Path | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Pretrain ``tiny_llama`` with ``method`` and return its results (final validation loss and perplexity,
    the loss curve, median time per step, optimizer state bytes, parameters, tokens seen). With ``out``, writes
    results.json, loss_curve.png and results.md there (all at the end, atomically). Bad input raises
    ``SubspacesError`` before any training."""
    run = _prepare(method, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup,
                   weight_decay=weight_decay, eval_every=eval_every, eval_batches=eval_batches, seed=seed,
                   hyperparameters=hyperparameters, model_kwargs=model_kwargs, device=device, dtype=dtype,
                   grad_clip=grad_clip)
    _check_out(Path(out) if out is not None else None)
    result = _train(run, progress=progress)
    if out is not None:
        from .._io import atomic_dir, write_json

        with atomic_dir(out, overwrite_ours=FILES) as tmp:
            write_json(tmp / "results.json", _finite(result))
            _write(tmp, [result], f"{method}: {steps} steps of {batch_size}x{seq_len} bytes")
    return result


def _prepare(method: str, **kw: Any) -> dict[str, Any]:
    """Validate everything and return the run's settings; nothing is built or trained yet."""
    _check_positive(steps=kw["steps"], batch_size=kw["batch_size"], seq_len=kw["seq_len"],
                    eval_every=kw["eval_every"], eval_batches=kw["eval_batches"])
    if isinstance(kw["seed"], bool) or not isinstance(kw["seed"], int) or kw["seed"] < 0:
        raise SubspacesError(f"seed={kw['seed']!r}: must be an integer >= 0")
    if not isinstance(kw["warmup"], (int, float)) or not 0 <= kw["warmup"] < 1:
        raise SubspacesError(f"warmup={kw['warmup']!r}: must be a fraction of the steps in [0, 1)")
    if not isinstance(kw["weight_decay"], (int, float)) or kw["weight_decay"] < 0:
        raise SubspacesError(f"weight_decay={kw['weight_decay']!r}: must be >= 0")
    if kw["grad_clip"] is not None and not kw["grad_clip"] > 0:
        raise SubspacesError(f"grad_clip={kw['grad_clip']!r}: must be > 0 or None")
    model_kwargs = dict(kw.pop("model_kwargs") or {})
    if "seed" in model_kwargs:
        raise SubspacesError("model_kwargs: pass the seed as seed=, not inside model_kwargs")
    hidden = model_kwargs.get("hidden_size", 256)
    lr, hp, config = resolve(method, kw.pop("hyperparameters"), kw.pop("lr"), hidden, kw["seed"])
    return {**kw, "method": method, "lr": lr, "hyperparameters": hp, "config": config,
            "model_kwargs": model_kwargs, "device": resolve_device(kw["device"]), "dtype": parse_dtype(kw["dtype"]) or torch.float32}


def _build(run: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """The model and its optimizer (the method may reparameterize the model); also AdamW's state size on the
    dense model, the reference of the state ratio."""
    from ..models import tiny_llama

    try:
        model = tiny_llama(seed=run["seed"], **run["model_kwargs"])
    except (TypeError, ValueError) as e:
        raise SubspacesError(f"model_kwargs {run['model_kwargs']}: {e}") from None
    model.to(device=run["device"], dtype=run["dtype"]).train()
    adamw_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        if run["method"] == BASELINE:
            opt = torch.optim.AdamW(model.parameters(), lr=run["lr"], weight_decay=run["weight_decay"],
                                    **run["hyperparameters"])
        else:
            from ..optim import setup_

            opt = setup_(model, run["config"], lr=run["lr"], weight_decay=run["weight_decay"])
    except SubspacesError:
        raise
    except ValueError as e:  # torch's own checks (eps < 0, ...): still the user's input
        raise SubspacesError(f"{run['method']}: {e}") from None
    return model, opt, adamw_bytes


def _train(run: dict[str, Any], progress: bool) -> dict[str, Any]:
    from ..optim import state_bytes

    steps, bs, seq_len, device = run["steps"], run["batch_size"], run["seq_len"], run["device"]
    train_tokens, val_tokens = split(corpus_tokens(), seq_len)
    n_val = run["eval_batches"] * bs
    val_starts = torch.linspace(0, len(val_tokens) - seq_len - 1, n_val).long()
    val_batches = [w.to(device) for w in _windows(val_tokens, val_starts, seq_len).split(bs)]
    gen = torch.Generator().manual_seed(run["seed"])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded methods (random supports, sampling) repeat; the
        torch.manual_seed(run["seed"])           # caller's global RNG is left as it was
        model, opt, adamw_bytes = _build(run)
        sched = schedule(opt, steps, run["warmup"])
        params = [p for p in model.parameters() if p.requires_grad]
        curve = [{"step": 0, "tokens": 0, "train_loss": None, "val_loss": _evaluate(model, val_batches)}]
        losses: list[float] = []
        times: list[float] = []
        diverged = False
        bar = _Bar(f"{run['method']}", steps) if progress else None
        try:
            for step in range(1, steps + 1):
                batch = _windows(train_tokens, torch.randint(0, len(train_tokens) - seq_len, (bs,), generator=gen),
                                 seq_len).to(device)
                t0 = time.perf_counter()
                loss = _loss(model, batch)
                loss.backward()
                if run["grad_clip"] is not None:
                    torch.nn.utils.clip_grad_norm_(params, run["grad_clip"])
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                value = loss.item()  # waits for the device, so the time below is the step's
                times.append(time.perf_counter() - t0)
                losses.append(value)
                diverged = not math.isfinite(value)
                if diverged or step % run["eval_every"] == 0 or step == steps:
                    since = losses[curve[-1]["step"]:]
                    curve.append({"step": step, "tokens": step * bs * seq_len, "train_loss": statistics.fmean(since),
                                  "val_loss": math.nan if diverged else _evaluate(model, val_batches)})
                if bar is not None:
                    bar.update(step, value, curve[-1]["val_loss"])
                if diverged:
                    break
        finally:
            if bar is not None:
                bar.stop()
    timed = times[TIMING_SKIP:] if len(times) > 2 * TIMING_SKIP else times
    state = state_bytes(opt)
    val = curve[-1]["val_loss"]
    return {
        "method": run["method"], "lr": run["lr"], "hyperparameters": _plain(run["hyperparameters"]),
        "steps": steps, "steps_done": len(losses), "batch_size": bs, "seq_len": seq_len, "warmup": run["warmup"],
        "weight_decay": run["weight_decay"], "grad_clip": run["grad_clip"], "seed": run["seed"],
        "model": {k: getattr(model.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                        "num_hidden_layers", "num_attention_heads")},
        "device": str(device), "dtype": str(run["dtype"]).removeprefix("torch."),
        "final_val_loss": val, "final_val_ppl": math.exp(min(val, 700.0)) if math.isfinite(val) else math.nan,
        "final_train_loss": curve[-1]["train_loss"], "diverged": diverged,
        "ms_per_step": 1000 * statistics.median(timed), "train_time_s": sum(times),
        "state_bytes": state, "state_mb": state / 2**20, "adamw_state_bytes": adamw_bytes,
        "state_vs_adamw": state / adamw_bytes,
        "params": sum(p.numel() for p in model.parameters()), "trainable_params": sum(p.numel() for p in params),
        "tokens_seen": len(losses) * bs * seq_len, "curve": curve, "train_losses": losses,
    }


def _plain(hp: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in hp.items()}


class _Bar:
    def __init__(self, description: str, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
            TimeRemainingColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn())
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, loss="-", val="-")

    def update(self, step: int, loss: float, val: float) -> None:
        self.progress.update(self.task, completed=step, loss=f"{loss:.3f}", val=f"{val:.3f}")

    def stop(self) -> None:
        self.progress.stop()


# ---------------------------------------------------------------------------------------------- comparison
def compare_pretraining(methods: tuple[str, ...] | list[str] = COMPARE_METHODS, *,
            hyperparameters: dict[str, dict[str, Any]] | None = None, out: str | Path | None = None,
            progress: bool = True, on_result=None, **kw: Any) -> list[dict[str, Any]]:
    """Pretrain each method with the same seed, data order and token budget (``kw`` as for ``pretrain``;
    ``hyperparameters`` maps a method to its own). Every method is validated, and built once, before any
    training. With ``out``, results.json is rewritten after each run and loss_curve.png and results.md written
    at the end. Returns one row per method (``rows``)."""
    methods = list(methods)
    if not methods:
        raise SubspacesError("compare: no methods given")
    if len(set(methods)) != len(methods):
        raise SubspacesError(f"compare: a method is repeated in {methods}")
    hyperparameters = dict(hyperparameters or {})
    extra = sorted(set(hyperparameters) - set(methods))
    if extra:
        raise SubspacesError(f"compare: hyperparameters given for {extra}, which are not among {methods}")
    for m in methods:
        check_method(m)  # every name first: a typo in the last one must not wait for the others to train
    runs = {m: _prepare(m, hyperparameters=hyperparameters.get(m), **_run_kw(kw)) for m in methods}
    for run in runs.values():  # setup errors (a rank too large for the model, ...) surface now
        with torch.random.fork_rng(devices=[run["device"]] if run["device"].type == "cuda" else []):
            _build(run)
    out = Path(out) if out is not None else None
    _check_out(out)
    results: list[dict[str, Any]] = []
    settings = {k: v for k, v in _run_kw(kw).items() if k not in ("device", "dtype")}
    for m in methods:
        results.append(_train(runs[m], progress=progress))
        if out is not None:
            from .._io import write_json

            write_json(out / "results.json", _finite({"settings": settings, "rows": rows(results), "runs": results}))
        if on_result is not None:
            on_result(rows(results)[-1])
    if out is not None:
        first = results[0]
        _write(out, results, f"{first['steps']} steps of {first['batch_size']}x{first['seq_len']} bytes, "
                                   f"seed {first['seed']}")
    return rows(results)


def _run_kw(kw: dict[str, Any]) -> dict[str, Any]:
    defaults = dict(steps=300, batch_size=16, seq_len=128, lr=None, warmup=0.1, weight_decay=0.0, eval_every=50,
                    eval_batches=8, seed=0, model_kwargs=None, device=None, dtype=None, grad_clip=1.0)
    unknown = sorted(set(kw) - set(defaults))
    if unknown:
        raise TypeError(f"compare_pretraining() got unexpected keyword argument(s) {unknown}")
    return {**defaults, **kw}


def rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """method, val loss, val ppl, state MB, state / AdamW, ms/step, params: one row per run."""
    return [{"method": r["method"], "val_loss": r["final_val_loss"], "val_ppl": r["final_val_ppl"],
             "state_mb": r["state_mb"], "state_vs_adamw": r["state_vs_adamw"], "ms_per_step": r["ms_per_step"],
             "params": r["params"], "diverged": r["diverged"]} for r in results]


# ---------------------------------------------------------------------------------------------- outputs
def _finite(obj: Any) -> Any:
    """NaN and infinities become null: strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def markdown(table: list[dict[str, Any]]) -> str:
    lines = ["| method | val loss | val ppl | state MB | state / AdamW | ms/step | params |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in table:
        note = " (diverged)" if r["diverged"] else ""
        lines.append(f"| {r['method']}{note} | {r['val_loss']:.4f} | {r['val_ppl']:.2f} | {r['state_mb']:.2f} | "
                     f"{r['state_vs_adamw']:.3f} | {r['ms_per_step']:.1f} | {r['params']:,} |")
    return "\n".join(lines) + "\n"


def _write(folder: Path, results: list[dict[str, Any]], title: str) -> None:
    """loss_curve.png and results.md (results.json is written by the callers, in their own layout)."""
    from .._io import atomic_path

    folder = Path(folder)
    plot(results, folder / "loss_curve.png", title)
    with atomic_path(folder / "results.md") as tmp:
        tmp.write_text(f"# Pretraining the tiny LLaMA: {title}\n\n" + markdown(rows(results)), encoding="utf-8")


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation loss (solid, markers) and the smoothed training loss (faint) against steps, one colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(results):
        color = plt.cm.tab10(i % 10)
        losses = r["train_losses"]
        k = max(1, len(losses) // 30)  # running mean over ~1/30 of the run
        smooth = [statistics.fmean(losses[max(0, j - k + 1):j + 1]) for j in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, color=color, alpha=0.35, linewidth=1)
        pts = [(c["step"], c["val_loss"]) for c in r["curve"] if math.isfinite(c["val_loss"])]
        ax.plot(*zip(*pts), color=color, marker="o", markersize=3, label=f"{r['method']} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title(f"{title}\nsolid: validation, faint: training (running mean)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
