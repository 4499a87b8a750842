"""Several methods on the same model, task and budget; a leaderboard saved as JSON and a PNG plot."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .._errors import SubspacesError
from .._io import atomic_path, write_json
from .finetune import BASELINES, finetune


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"lora"`` or ``"lora:rank=16,alpha=32,targets=[query, value]"`` -> (name, hyperparameters)."""
    import yaml

    name, _, rest = spec.partition(":")
    hp: dict[str, Any] = {}
    depth, item = 0, ""
    for ch in rest + ",":  # split on commas outside brackets
        depth += (ch in "[{") - (ch in "]}")
        if ch == "," and depth == 0:
            if item.strip():
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise SubspacesError(f"method {spec!r}: expected name:key=value,... (got {item!r})")
                hp[key.strip()] = yaml.safe_load(value)
            item = ""
        else:
            item += ch
    check_method(name.strip())
    return name.strip(), hp


def check_method(name: str) -> None:
    from .._registry import ADAPTERS

    if name not in BASELINES and name not in ADAPTERS:
        from .._errors import did_you_mean

        raise SubspacesError(f"unknown method {name!r}." + did_you_mean(name, [*BASELINES, *(e.name for e in ADAPTERS)]))


def leaderboard(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-r["test_accuracy"], r["trainable_params"]))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["trainable_params"], r["test_accuracy"], s=40)
        ax.annotate(r["label"], (r["trainable_params"], r["test_accuracy"]), textcoords="offset points",
                    xytext=(5, 4), fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


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
    specs = [s for s in methods]
    for base in BASELINES:
        if base not in [parse_method(s)[0] for s in specs]:
            specs.insert(0 if base == "probe" else len(specs), base)
    parsed = [(s, *parse_method(s)) for s in specs]  # validate every spec before any work
    rows: list[dict[str, Any]] = []
    started = time.time()
    for label, name, hp in parsed:
        metrics, _ = finetune(model=model, task=task, method=name, hyperparameters=hp, epochs=epochs, seed=seed,
                              **run_kw)
        metrics.pop("loss_history")
        rows.append({"label": label, **metrics})
        write_json(out / "results.json", {"model": model, "task": task, "epochs": epochs, "seed": seed,
                                          "leaderboard": leaderboard(rows)})
        if on_result is not None:
            on_result(rows[-1])
    board = leaderboard(rows)
    plot(board, out / "leaderboard.png", f"{task} on {model}: {epochs:g} epochs, seed {seed} "
                                         f"({(time.time() - started) / 60:.1f} min)")
    return board
