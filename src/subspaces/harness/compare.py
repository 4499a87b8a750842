"""Several methods on the same model, task and budget: adapters, train-family optimizers and the baselines in one
leaderboard, saved as results.json (the run's config, package versions, per-run metrics over steps, memory, time,
artifact size), leaderboard.png (accuracy against trainable parameters and against peak memory), loss_curves.png and,
for causal LMs, a sample of generations per run under generations/."""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from .._io import atomic_path, write_json
from ._methods import BASELINES, parse_method
from ._run import versions

#: Per task kind: the recipe's defaults (the CLI's unset options take these).
DEFAULTS = {
    "classification": {"model": "minilm", "epochs": 3, "batch_size": 32, "max_length": 64},
    "causal-lm": {"model": "smollm2", "epochs": 1, "batch_size": 8, "max_length": 256},
}
AVERAGED = ("test_accuracy", "test_accuracy_flexible", "test_macro_f1", "eval_loss", "eval_perplexity", "wall_time_s", "peak_memory_mb",
            "optimizer_state_bytes")


def with_defaults(kind: str, model: str | None, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(model, recipe options) of a task kind: the given ones, the kind's :data:`DEFAULTS` where unset (None)."""
    given = {k: v for k, v in options.items() if v is not None}
    return model or DEFAULTS[kind]["model"], {**{k: v for k, v in DEFAULTS[kind].items() if k != "model"}, **given}


def score(row: dict[str, Any]) -> float:
    """The leaderboard's key: accuracy where the task has one, else minus the held-out loss."""
    acc = row.get("test_accuracy")
    return acc if acc is not None else -row.get("eval_loss", float("inf"))


def leaderboard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-score(r), r["trainable_params"]))


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label over its seeds: the mean of each metric (:data:`AVERAGED`) and the sample standard
    deviation of accuracy and loss; sorted as a leaderboard."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in by_label.items():
        row = {**rs[0], "seed": None, "seeds": [r["seed"] for r in rs]}
        for key in AVERAGED:
            values = [r[key] for r in rs if r.get(key) is not None]
            if len(values) == len(rs):
                row[key] = statistics.fmean(values)
                if key in ("test_accuracy", "eval_loss"):
                    row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                    row[key.replace("test_accuracy", "test_accuracies").replace("eval_loss", "eval_losses")] = values
        rows.append(row)
    return leaderboard(rows)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Accuracy (or held-out loss) against trainable parameters and against peak memory, one point per method."""
    plt = _pyplot()
    acc = all(r.get("test_accuracy") is not None for r in rows)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, xlabel in ((axes[0], "trainable_params", "trainable parameters"),
                            (axes[1], "peak_memory_mb", "peak memory (MB)")):
        for i, r in enumerate(rows):
            x, y = max(r[key], 1), r["test_accuracy"] if acc else r["eval_loss"]
            ax.scatter(x, y, s=40, color=plt.cm.tab10(i % 10))
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("test accuracy" if acc else "held-out loss")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_losses(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """The training loss over steps of every run (one line per method and seed)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = list(dict.fromkeys(r["label"] for r in runs))
    for r in runs:
        steps = [h["step"] for h in r["loss_history"]]
        if steps:
            color = plt.cm.tab10(labels.index(r["label"]) % 10)
            ax.plot(steps, [h["loss"] for h in r["loss_history"]], color=color, alpha=0.8, lw=1,
                    label=r["label"] if r["seed"] == runs[0]["seed"] else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    _pyplot().close(fig)


def run_one(kw: dict[str, Any]) -> dict[str, Any]:
    """One run of the recipe of the task's kind (``kw["task"]``: a :class:`~subspaces.data.TaskSpec`)."""
    from .finetune import finetune
    from .sft import finetune_lm

    kw = dict(kw)
    spec = kw.pop("task")
    recipe = finetune_lm if spec.kind == "causal-lm" else finetune
    return recipe(task=spec.load(kw["seed"]), **kw)[0]


def _child(kw: dict[str, Any], queue, log_level: int, warning_filters: list) -> None:
    import logging
    import warnings

    from .._errors import SubspacesError

    # a spawned process starts with default logging and warnings: keep the parent's (the CLI quiets third parties)
    logging.getLogger().setLevel(log_level)
    warnings.filters[:] = warning_filters
    try:
        queue.put(("ok", run_one(kw)))
    except SubspacesError as e:
        queue.put(("error", str(e)))
    except BaseException:
        import traceback

        queue.put(("crash", traceback.format_exc()))


def _run_in_fresh_process(kw: dict[str, Any]) -> dict[str, Any]:
    """One run in a new process, so its wall time and peak memory owe nothing to the runs before it (memory
    freed by an earlier run stays in this process's heap and would hide the next run's growth)."""
    import logging
    import multiprocessing
    import warnings
    from queue import Empty

    from .._errors import SubspacesError

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kw, queue, logging.getLogger().level, list(warnings.filters)))
    proc.start()
    try:
        while True:
            try:
                status, value = queue.get(timeout=1.0)
                break
            except Empty:
                if not proc.is_alive():  # killed (out of memory?) before it could report
                    status, value = "crash", f"the process exited with code {proc.exitcode}"
                    break
    finally:
        proc.join()
    if status == "error":
        raise SubspacesError(value)
    if status == "crash":
        raise RuntimeError(f"the {kw['method']} run failed:\n{value}")
    return value


def compare(
    methods: list[str],
    *,
    out: Path,
    task: Any = "docstring",
    model: str | None = None,
    seeds: list[int] = (0,),
    baselines: bool = True,
    on_result=None,
    **run_kw: Any,
) -> list[dict[str, Any]]:
    """Run each method spec (plus, with ``baselines``, the task kind's baselines: the probe or zero-shot model, and
    full fine-tuning) once per seed, writing ``results.json`` after every run (nothing is lost if a later run fails)
    and the plots at the end. ``task``: an embedded name or a :class:`~subspaces.data.TaskSpec`; ``run_kw`` go to
    the recipe (epochs, batch_size, lr, ...). Returns the leaderboard: one row per method over the seeds."""
    from ..data import TaskSpec

    spec = TaskSpec(task) if isinstance(task, str) else task
    kind = spec.kind
    parsed = [(s, *parse_method(s, kind)) for s in methods]  # validate every spec before any work
    model, run_kw = with_defaults(kind, model, run_kw)
    names = {name for _, name, _ in parsed}
    first, last = BASELINES[kind]
    if baselines and first not in names:
        parsed.insert(0, (first, first, {}))
    if baselines and last not in names:
        parsed.append((last, last, {}))
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first process writes
    isolate = int(os.environ.get("WORLD_SIZE", "1")) == 1
    config = {"task": spec.name, "data": spec.data, "task_options": dict(spec.options), "task_kind": kind,
              "model": model, "methods": [label for label, _, _ in parsed], "seeds": list(seeds), **run_kw}
    rows: list[dict[str, Any]] = []
    started = time.time()
    for seed in seeds:
        for label, name, hp in parsed:
            kw = dict(model=model, task=spec, method=name, hyperparameters=hp, seed=seed, **run_kw)
            metrics = _run_in_fresh_process(kw) if isolate else run_one(kw)
            generations = metrics.pop("generations", None)
            rows.append({"label": label, **metrics})
            if main:
                if generations is not None:
                    write_generations(out / "generations" / f"{_slug(label)}-seed{seed}.jsonl", generations)
                write_json(out / "results.json", {"config": config, "versions": versions(),
                                                  "leaderboard": summarize(rows), "runs": rows})
            if on_result is not None:
                on_result(rows[-1])
    board = summarize(rows)
    if main:
        minutes = (time.time() - started) / 60
        which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of {len(seeds)} seeds"
        title = f"{spec.name} on {Path(model).name}: {which} ({minutes:.1f} min)"
        plot(board, out / "leaderboard.png", title)
        plot_losses(rows, out / "loss_curves.png", title)
    return board


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def write_generations(path: Path, rows: list[dict[str, Any]]) -> None:
    """One JSON line per generation (prompt, reference, output, correct), written atomically."""
    import json

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
