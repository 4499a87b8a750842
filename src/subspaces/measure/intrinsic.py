"""The intrinsic dimension of a fine-tuning task: the smallest random-subspace dimension d that reaches a fraction
(90%: d_int90) of full fine-tuning's metric.

Li, Farkhoor, Liu & Yosinski, "Measuring the Intrinsic Dimension of Objective Landscapes", ICLR 2018,
https://arxiv.org/abs/1804.08838 (sweep d, read off d_int90 from the metric-vs-d curve); applied to pretrained
language-model fine-tuning by Aghajanyan, Zettlemoyer & Gupta, ACL 2021, https://arxiv.org/abs/2012.13255 (SAID:
d_int90 of a few hundred for RoBERTa on MRPC). Each point is one run of the ``intrinsic`` or ``said`` adapter
(``subspaces.adapters``) through the fine-tuning harness.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .._errors import SubspacesError

__all__ = ["intrinsic_dimension"]

DEFAULT_DIMS = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)  # a 1-2-5 geometric grid


def _check_dims(dims: Sequence[int]) -> list[int]:
    out = sorted(set(dims))
    if not out or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in out):
        raise SubspacesError(f"intrinsic_dimension: dims={list(dims)!r} must be positive integers")
    return out


def intrinsic_dimension(
    *,
    model: str = "minilm",
    task: str = "docstring",
    method: str = "intrinsic",
    dims: Sequence[int] = DEFAULT_DIMS,
    threshold: float = 0.9,
    full_metric: float | None = None,
    lr: float = 3e-2,
    epochs: float = 3,
    seed: int = 0,
    targets: str | list[str] = "all-linear",
    projection: str = "fastfood",
    train_head: bool = False,
    refine: int = 0,
    stop_early: bool = True,
    metric: str = "test_accuracy",
    out: str | os.PathLike | None = None,
    train: Callable[..., Any] | None = None,
    progress: bool = True,
    **run_kw: Any,
) -> dict[str, Any]:
    """Search d_int = the smallest subspace dimension d whose run reaches ``threshold`` × the full fine-tuning
    ``metric`` (d_int90 for the default 0.9).

    ``dims`` are tried in increasing order, each one run of ``method`` ("intrinsic" or "said") with
    ``{"dim": d, "lr": lr, "targets": targets, "projection": projection, "seed": seed, "train_head": train_head}``
    (the projection is drawn from the run's seed). With ``train_head=False`` (the default, as the papers: every
    parameter inside the subspace) the classification head is adapted with the targets instead of being trained
    on its own, which alone would reach a linear probe's accuracy whatever d. The full baseline is one ``method="full"`` run (harness learning rate) unless
    ``full_metric`` is given. ``stop_early`` stops at the first d that reaches the target; ``refine`` then runs up
    to that many geometric bisection steps (d = round(√(lo·hi))) between the last failing and the first passing d.
    ``train`` is called with the harness's keywords (default ``subspaces.harness.finetune.finetune``) and returns
    its metrics dict, or (metrics, model); ``run_kw`` (batch_size, max_train, bf16, ...) is passed through.
    The papers' learning rate for subspace training is high: 3e-2 (the SAID port, Adam).

    Returns ``{"dims", "metrics", "full_metric", "target", "threshold", "d_int", "runs", ...}``: ``dims`` ascending
    with their ``metrics``, ``d_int`` the smallest passing d (None if none passes). With ``out`` (a folder), writes
    ``results.json`` after every run and ``intrinsic_dimension.png`` (metric vs d, log x, the target line) at the
    end, atomically.
    """
    dims = _check_dims(dims)
    if not 0 < threshold <= 1:
        raise SubspacesError(f"intrinsic_dimension: threshold={threshold!r} must be in (0, 1]")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise SubspacesError(f"intrinsic_dimension: refine={refine!r} must be a non-negative integer")
    if train is None:
        from ..harness.finetune import finetune as train
    main = out is not None and int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first one writes
    common = dict(model=model, task=task, epochs=epochs, seed=seed, progress=False, **run_kw)
    result: dict[str, Any] = {"model": model, "task": task, "method": method, "metric": metric,
                              "threshold": threshold, "lr": lr, "epochs": epochs, "seed": seed, "dims": [],
                              "metrics": [], "full_metric": full_metric, "target": None, "d_int": None, "runs": []}

    def run(label: str, **kw: Any) -> float:
        bar.update(task_id, description=f"d_int of {method}: {label}")
        got = train(**common, **kw)
        metrics = dict(got[0] if isinstance(got, tuple) else got)
        metrics.pop("loss_history", None)
        if metric not in metrics:
            raise SubspacesError(f"intrinsic_dimension: the run returned no {metric!r} (got {sorted(metrics)})")
        result["runs"].append({"label": label, **metrics})
        bar.advance(task_id)
        return float(metrics[metric])

    def subspace(d: int) -> bool:
        hp = {"dim": d, "lr": lr, "targets": targets, "projection": projection, "seed": seed,
              "train_head": train_head}
        value = run(f"d={d}", method=method, hyperparameters=hp)
        pairs = sorted([*zip(result["dims"], result["metrics"]), (d, value)])
        result["dims"], result["metrics"] = [p[0] for p in pairs], [p[1] for p in pairs]
        passing = [p[0] for p in pairs if p[1] >= result["target"]]
        result["d_int"] = passing[0] if passing else None
        if main:
            _write(out, result)
        return value >= result["target"]

    bar = _progress(progress)
    with bar:
        task_id = bar.add_task(f"d_int of {method}", total=len(dims) + refine + (full_metric is None))
        if full_metric is None:
            result["full_metric"] = run("full", method="full", hyperparameters={})
        result["target"] = threshold * result["full_metric"]
        for d in dims:
            if subspace(d) and stop_early:
                break
        hi = result["d_int"]
        below = [d for d in result["dims"] if hi is not None and d < hi]
        if below:  # every d below the first passing one failed: bisect the bracket (lo, hi)
            lo = below[-1]
            for _ in range(refine):
                mid = round(math.sqrt(lo * hi))
                if mid in (lo, hi):
                    break
                if subspace(mid):
                    hi = mid
                else:
                    lo = mid
        bar.update(task_id, total=len(result["runs"]), completed=len(result["runs"]))
    if main:
        _plot(result, Path(out) / "intrinsic_dimension.png")
    return result


def _progress(enabled: bool):
    """A rich progress bar over the runs (each run's own per-step bar is off: rich shows one live display)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled)


def _write(out: str | os.PathLike, result: dict[str, Any]) -> None:
    from .._io import write_json

    write_json(Path(out) / "results.json", result)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_path

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result["dims"], result["metrics"], "o-", color="tab:blue", label=result["method"])
    pct = f"{100 * result['threshold']:g}%"
    ax.axhline(result["target"], color="tab:red", linestyle="--", label=f"{pct} of full ({result['target']:.3f})")
    ax.axhline(result["full_metric"], color="gray", linestyle=":", label=f"full fine-tuning ({result['full_metric']:.3f})")
    found = result["d_int"]
    if found is not None:
        ax.axvline(found, color="tab:green", alpha=0.5, label=f"d_int = {found}")
    ax.set_xscale("log")
    ax.set_xlabel("subspace dimension d (log scale)")
    ax.set_ylabel(result["metric"].replace("_", " "))
    ax.set_title(f"{result['task']} on {result['model']}: d_int{result['threshold'] * 100:g} = {found}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
