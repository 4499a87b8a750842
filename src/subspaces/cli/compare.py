"""``subspaces compare``: the main job — a leaderboard of methods on one model, task and budget."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .._errors import SubspacesError
from . import app
from ._common import (AnswerPattern, BatchSize, CompletionColumn, Data, Epochs, LabelColumn, MaxLength, MaxNewTokens,
                      MaxSteps, MessagesColumn, Model, Packing, PromptColumn, Split, Task, TestFraction, TextColumn,
                      Validation, is_main_process, new_console, output_dir, results_table, task_and_options)

Opt = typer.Option


@app.command("compare")
def compare(
    method: Annotated[list[str], Opt("--method", "-m", help="a method, optionally with hyperparameters: 'lora', "
                                     "'lora:rank=16,alpha=32', 'galore:rank=64', 'dct' (repeatable; adapters and "
                                     "train methods, see `subspaces methods`); the baselines (probe or zero-shot, "
                                     "and full) are included unless --no-baselines")] = ["lora:lr=3e-3,targets=all-linear"],
    task: Task = "docstring",
    data: Data = None,
    model: Model = None,
    validation: Validation = None,
    split: Split = None,
    test_fraction: TestFraction = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = None,
    prompt_column: PromptColumn = None,
    completion_column: CompletionColumn = None,
    messages_column: MessagesColumn = None,
    answer_pattern: AnswerPattern = None,
    epochs: Epochs = None,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = None,
    max_length: MaxLength = None,
    max_new_tokens: MaxNewTokens = 64,
    packing: Packing = False,
    max_train: Annotated[Optional[int], Opt(help="use only the first N training examples")] = None,
    max_test: Annotated[Optional[int], Opt(help="use only the first N test examples")] = None,
    seed: Annotated[list[int], Opt(help="seed of the split, the initialization and the data order; repeat it "
                                        "(--seed 0 --seed 1 --seed 2) for the mean and spread over seeds")] = [0],
    bf16: Annotated[bool, Opt(help="bf16 autocast")] = False,
    baselines: Annotated[bool, Opt(help="also run the baselines: probe (classification) or zero-shot (causal LM), "
                                        "and full fine-tuning")] = True,
    out: Annotated[Optional[Path], Opt(help="output folder (new or empty); default runs/compare-<time>")] = None,
) -> None:
    """Fine-tune several methods — adapters, low-rank optimizers and full fine-tuning — on the same model, task
    and budget, and print a leaderboard: test accuracy (classification: and macro-F1; causal LM: generative exact
    match, and the held-out loss of the completions), trainable parameters, optimizer state, wall time, peak memory.
    Writes results.json (config, versions, every run's metrics over steps), leaderboard.png, loss_curves.png and,
    for a causal LM, generations/ (prompt, reference, output)."""
    from ..harness.compare import compare as run, parse_method

    spec, opts = task_and_options(locals())
    for m in method:
        parse_method(m, spec.kind)  # fail on a bad spec before loading anything
    if len(set(seed)) != len(seed):
        raise SubspacesError(f"--seed repeats a value: {seed}")
    out = output_dir(out, "compare")
    console = new_console()
    main = is_main_process()

    def report(row: dict) -> None:
        if main:
            acc = row.get("test_accuracy")
            what = f"test accuracy {acc:.4f}" if acc is not None else f"held-out loss {row['eval_loss']:.4f}"
            console.print(f"[bold]{row['label']}[/] (seed {row['seed']}): {what}")

    board = run(method, out=out, task=spec, model=model, seeds=seed, baselines=baselines, progress=main,
                on_result=report, **opts)
    if main:
        which = f"seed {seed[0]}" if len(seed) == 1 else f"mean ± std over seeds {', '.join(map(str, seed))}"
        console.print(results_table(board, f"{spec.name} on {board[0]['model']}, {which}"))
        console.print(f"results.json, leaderboard.png and loss_curves.png in {out}/")
