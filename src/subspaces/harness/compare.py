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
                    hp[key.strip()] = yaml.safe_load(value)
                except yaml.YAMLError:
                    raise SubspacesError(f"{context}: cannot parse the value of {key.strip()!r}") from None
            item = ""
        else:
            item += ch
    if depth:
        raise SubspacesError(f"{context}: unbalanced brackets in {text!r}")
    return hp


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


def _child(kw: dict[str, Any], queue) -> None:
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
    import multiprocessing
    from queue import Empty

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(kw, queue))
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
    seed: int = 0,
    on_result=None,
    **run_kw: Any,
) -> list[dict[str, Any]]:
    """Run each method spec (plus the probe and full fine-tuning baselines), writing ``results.json`` after every
    run (nothing is lost if a later run fails) and ``leaderboard.png`` at the end. Returns the leaderboard."""
    parsed = [(s, *parse_method(s)) for s in methods]  # validate every spec before any work
    names = {name for _, name, _ in parsed}
    if "probe" not in names:
        parsed.insert(0, ("probe", "probe", {}))
    if "full" not in names:
        parsed.append(("full", "full", {}))
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only the first process writes
    rows: list[dict[str, Any]] = []
    started = time.time()
    isolate = int(os.environ.get("WORLD_SIZE", "1")) == 1
    for label, name, hp in parsed:
        kw = dict(model=model, task=task, method=name, hyperparameters=hp, epochs=epochs, seed=seed, **run_kw)
        metrics = _run_in_fresh_process(kw) if isolate else finetune(**kw)[0]
        metrics.pop("loss_history")
        rows.append({"label": label, **metrics})
        if main:
            write_json(out / "results.json", {"model": model, "task": task, "epochs": epochs, "seed": seed,
                                              "leaderboard": leaderboard(rows)})
        if on_result is not None:
            on_result(rows[-1])
    board = leaderboard(rows)
    if main:
        minutes = (time.time() - started) / 60
        plot(board, out / "leaderboard.png", f"{task} on {model}: {epochs:g} epochs, seed {seed} ({minutes:.1f} min)")
    return board
