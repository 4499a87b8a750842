"""``subspaces compare``: the main job — a leaderboard of methods on one model, task and budget."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .._errors import SubspacesError
from . import app
from ._common import is_main_process, output_dir, results_table

Opt = typer.Option


@app.command("compare")
def compare(
    method: Annotated[list[str], Opt("--method", "-m", help="a method, optionally with hyperparameters: "
                                     "'lora' or 'lora:rank=16,alpha=32' (repeatable); the baselines 'probe' and "
                                     "'full' are included unless --no-baselines")] = ["lora"],
    model: Annotated[str, Opt(help="'minilm' (embedded default) or a Hugging Face model folder")] = "minilm",
    task: Annotated[str, Opt(help="docstring, concurrency, net, formats, devtools, chatterbot-topics, "
                                  "chatterbot-languages")] = "docstring",
    epochs: Annotated[float, Opt(help="the same training budget for every method")] = 3,
    batch_size: Annotated[int, Opt(help="global batch size")] = 32,
    max_length: Annotated[int, Opt(help="max tokens per text")] = 64,
    max_train: Annotated[Optional[int], Opt(help="use only the first N training examples")] = None,
    max_test: Annotated[Optional[int], Opt(help="use only the first N test examples")] = None,
    seed: Annotated[list[int], Opt(help="seed of the split, the initialization and the data order; repeat it "
                                        "(--seed 0 --seed 1 --seed 2) for the mean and spread over seeds")] = [0],
    bf16: Annotated[bool, Opt(help="bf16 autocast")] = False,
    baselines: Annotated[bool, Opt(help="also run the linear probe and full fine-tuning")] = True,
    out: Annotated[Optional[Path], Opt(help="output folder (new or empty); default runs/compare-<time>")] = None,
) -> None:
    """Fine-tune several methods on the same model and task with the same budget and print a leaderboard of
    test accuracy, trainable parameters, wall time and peak memory; writes results.json and leaderboard.png."""
    from rich.console import Console

    from ..harness.compare import compare as run, parse_method

    for spec in method:
        parse_method(spec)  # fail on a bad spec before loading anything
    if len(set(seed)) != len(seed):
        raise SubspacesError(f"--seed repeats a value: {seed}")
    out = output_dir(out, "compare")
    console = Console()
    main = is_main_process()

    def report(row: dict) -> None:
        if main:
            console.print(f"[bold]{row['label']}[/] (seed {row['seed']}): test accuracy {row['test_accuracy']:.4f}")

    board = run(method, out=out, model=model, task=task, epochs=epochs, seeds=seed, baselines=baselines,
                batch_size=batch_size,
                max_length=max_length, max_train=max_train, max_test=max_test, bf16=bf16, progress=main,
                on_result=report)
    if main:
        which = f"seed {seed[0]}" if len(seed) == 1 else f"mean ± std over seeds {', '.join(map(str, seed))}"
        console.print(results_table(board, f"{task} on {model}, {epochs:g} epochs, {which}"))
        console.print(f"results.json and leaderboard.png in {out}/")
