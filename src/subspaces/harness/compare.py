"""Several methods on the same model, task and budget; a leaderboard saved as JSON and a PNG plot."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from .._errors import SubspacesError
from .._io import atomic_path, write_json
from .finetune import BASELINES, finetune


def parse_params(text: str, context: str) -> dict[str, Any]:
    """``"rank=16,alpha=32,targets=[query, value]"`` -> a dict; values are read as YAML scalars or lists."""
    import yaml

    hp: dict[str, Any] = {}
    depth, item = 0, ""
    for ch in text + ",":  # split on commas outside brackets
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            if item.strip():
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise SubspacesError(f"{context}: expected key=value,... (got {item!r})")
                try:
                    hp[key.strip()] = _number(yaml.safe_load(value))
                except yaml.YAMLError:
                    raise SubspacesError(f"{context}: cannot parse the value of {key.strip()!r}") from None
            item = ""
        else:
            item += ch
    if depth:
        raise SubspacesError(f"{context}: unbalanced brackets in {text!r}")
    return hp


def _number(value: Any) -> Any:
    """YAML 1.1 reads ``3e-2`` (no dot) as a string: take it as the float a user means."""
    if isinstance(value, str) and any(c.isdigit() for c in value):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"lora"`` or ``"lora:rank=16,alpha=32,targets=[query, value]"`` -> (name, hyperparameters)."""
    name, _, rest = spec.partition(":")
    check_method(name.strip())
    return name.strip(), parse_params(rest, f"method {spec!r}")


def check_method(name: str) -> None:
    from .._registry import ADAPTERS

    if name not in BASELINES and name not in ADAPTERS:
        from .._errors import did_you_mean

        valid = [*BASELINES, *(e.name for e in ADAPTERS)]
        raise SubspacesError(f"unknown method {name!r}." + did_you_mean(name, valid))


def leaderboard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-r["test_accuracy"], r["trainable_params"]))


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per label over its seeds: mean test accuracy with its sample standard deviation, mean wall time
    and peak memory; sorted as a leaderboard."""
    import statistics

    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_label.setdefault(r["label"], []).append(r)
    rows = []
    for label, rs in by_label.items():
        acc = [r["test_accuracy"] for r in rs]
        rows.append({**rs[0], "seed": None, "seeds": [r["seed"] for r in rs],
                     "test_accuracy": statistics.fmean(acc),
                     "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "test_accuracies": acc,
                     "wall_time_s": statistics.fmean(r["wall_time_s"] for r in rs),
                     "peak_memory_mb": statistics.fmean(r["peak_memory_mb"] for r in rs)})
    return leaderboard(rows)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        ax.scatter(r["trainable_params"], r["test_accuracy"], s=40, color=plt.cm.tab20(i % 20))
        ax.annotate(r["label"], (r["trainable_params"], r["test_accuracy"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)  # room for the labels of the end points
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _child(kw: dict[str, Any], queue, log_level: int, warning_filters: list) -> None:
    import logging
    import warnings

    # a spawned process starts with default logging and warnings: keep the parent's (the CLI quiets third parties)
    logging.getLogger().setLevel(log_level)
    warnings.filters[:] = warning_filters
    try:
        queue.put(("ok", finetune(**kw)[0]))
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
    model: str = "minilm",
    task: str = "docstring",
    epochs: float = 3,
    seeds: list[int] = (0,),
    baselines: bool = True,
    on_result=None,
    **run_kw: Any,
) -> list[dict[str, Any]]:
    """Run each method spec (plus, with ``baselines``, the probe and full fine-tuning) once per seed, writing
    ``results.json`` after every run (nothing is lost if a later run fails) and ``leaderboard.png`` at the end.
    Returns the leaderboard: one row per method, accuracy averaged over the seeds (``summarize``)."""
    parsed = [(s, *parse_method(s)) for s in methods]  # validate every spec before any work
    names = {name for _, name, _ in parsed}
    if baselines and "probe" not in names:
        parsed.insert(0, ("probe", "probe", {}))
    if baselines and "full" not in names:
        parsed.append(("full", "full", {}))
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first process writes
    rows: list[dict[str, Any]] = []
    started = time.time()
    isolate = int(os.environ.get("WORLD_SIZE", "1")) == 1
    seeds = list(seeds)
    for seed in seeds:
        for label, name, hp in parsed:
            kw = dict(model=model, task=task, method=name, hyperparameters=hp, epochs=epochs, seed=seed, **run_kw)
            metrics = _run_in_fresh_process(kw) if isolate else finetune(**kw)[0]
            metrics.pop("loss_history")
            rows.append({"label": label, **metrics})
            if main:
                write_json(out / "results.json", {"model": model, "task": task, "epochs": epochs, "seeds": seeds,
                                                  "leaderboard": summarize(rows), "runs": rows})
            if on_result is not None:
                on_result(rows[-1])
    board = summarize(rows)
    if main:
        minutes = (time.time() - started) / 60
        which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of {len(seeds)} seeds"
        plot(board, out / "leaderboard.png", f"{task} on {model}: {epochs:g} epochs, {which} ({minutes:.1f} min)")
    return board
