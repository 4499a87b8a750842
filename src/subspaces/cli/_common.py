"""Helpers shared by subcommands: output folders, process rank, result tables."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .._errors import SubspacesError


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def output_dir(out: Path | None, stem: str) -> Path:
    """``out`` or a fresh ``runs/<stem>-<time>``; an existing folder must be empty (we never mix with or
    overwrite a user's files)."""
    if out is None:
        out = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SubspacesError(f"output {out} already exists and is not an empty folder; choose another --out")
    return out


def new_console():
    """A rich console; written to a file or a pipe (no terminal width to follow), 140 columns so that tables stay
    readable in logs instead of wrapping at rich's default 80."""
    import sys

    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=140)


def results_table(rows: list[dict], title: str):
    from rich.table import Table

    table = Table(title=title)
    lm = rows[0].get("task_kind") == "causal-lm"
    cols = ["method", "test acc", *(["flex acc", "held-out loss"] if lm else ["macro-F1"]), "trainable params",
            "state MB", "time (s)", "peak MB"]
    for col in cols:  # the method spec wraps rather than being cut: it is the row's whole configuration
        table.add_column(col, justify="left" if col == "method" else "right", overflow="fold",
                         no_wrap=col != "method")
    many = len(rows[0].get("seeds", ())) > 1

    def fmt(r, key):
        if r.get(key) is None:
            return "-"
        return f"{r[key]:.4f}" + (f" ± {r[key + '_std']:.4f}" if many and key + "_std" in r else "")

    for r in rows:
        middle = [fmt(r, "test_accuracy_flexible"), fmt(r, "eval_loss")] if lm else [fmt(r, "test_macro_f1")]
        table.add_row(r.get("label", r["method"]), fmt(r, "test_accuracy"), *middle, f"{r['trainable_params']:,}",
                      f"{r.get('optimizer_state_bytes', 0) / 2**20:.1f}", f"{r['wall_time_s']:.1f}",
                      f"{r['peak_memory_mb']:.0f}")
    return table


# --------------------------------------------------------------------------- options shared by tune and compare
# Typer reads options from each command's signature; the annotations are written once here.
Opt = typer.Option
TASK_HELP = ("an embedded task: docstring, concurrency, net, formats, devtools, chatterbot-topics, "
             "chatterbot-languages (classification), arithmetic (causal LM); or, with --data, 'classification' or "
             "'causal-lm'")
Task = Annotated[str, Opt(help=TASK_HELP)]
Model = Annotated[Optional[str], Opt(help="'minilm', 'smollm2' or a Hugging Face model folder; default by task: "
                                          "minilm (classification), smollm2 (causal LM)")]
Data = Annotated[Optional[Path], Opt(help="your data: a .jsonl, .json, .csv or .parquet file, or a folder written by "
                                          "datasets' save_to_disk (with --task classification or causal-lm)")]
Validation = Annotated[Optional[Path], Opt(help="a second file with the same columns: the held-out set (default: "
                                                "--test-fraction of --data)")]
Split = Annotated[Optional[str], Opt(help="the split of a saved DatasetDict (default: train)")]
TestFraction = Annotated[Optional[float], Opt(help="the held-out fraction of --data without --validation "
                                                   "(default: 0.2 classification, 0.1 causal LM)")]
TextColumn = Annotated[Optional[str], Opt(help="classification: the text column (default: text)")]
LabelColumn = Annotated[Optional[str], Opt(help="classification: the label column, strings or integers "
                                                "(default: label)")]
PromptColumn = Annotated[Optional[str], Opt(help="causal LM: the prompt column (default: prompt, unless a "
                                                 "'messages' column holds chats)")]
CompletionColumn = Annotated[Optional[str], Opt(help="causal LM: the completion column, the tokens trained on "
                                                     "(default: completion)")]
MessagesColumn = Annotated[Optional[str], Opt(help="causal LM: a column of chats [{role, content}, ...] rendered "
                                                   "with the tokenizer's chat template; the last (assistant) "
                                                   "message is trained on (default: messages, when present)")]
AnswerPattern = Annotated[Optional[str], Opt(help="causal LM: a regex whose first group is the answer in a "
                                                  "completion and in a generation (default: GSM8K's '#### N')")]
MaxNewTokens = Annotated[int, Opt(help="causal LM: tokens generated per test prompt (greedy)")]
Packing = Annotated[bool, Opt(help="causal LM: pack several examples per sequence (TRL)")]
Epochs = Annotated[Optional[float], Opt(help="training epochs (default: 3 classification, 1 causal LM)")]
MaxSteps = Annotated[Optional[int], Opt(help="optimizer steps (overrides --epochs)")]
BatchSize = Annotated[Optional[int], Opt(help="global batch size, split across torchrun processes (default: 32 "
                                              "classification, 8 causal LM)")]
MaxLength = Annotated[Optional[int], Opt(help="max tokens per example (default: 64 classification, 256 causal LM)")]


def task_spec(task: str, data: Path | None, **options) -> Any:
    """The task the options name, checked now (columns, labels, files) so that bad input fails before any work."""
    from ..data import TaskSpec

    spec = TaskSpec(task, str(data) if data is not None else None,
                    tuple(sorted((k, str(v) if isinstance(v, Path) else v) for k, v in options.items()
                                 if v is not None)))
    spec.load(0)
    return spec


TASK_KEYS = ("validation", "split", "test_fraction", "text_column", "label_column", "prompt_column",
             "completion_column", "messages_column", "answer_pattern")
RUN_KEYS = ("epochs", "max_steps", "batch_size", "max_length", "max_new_tokens", "packing", "max_train", "max_test",
            "bf16")


def task_and_options(given: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(task spec, recipe options) from a command's parameters (``locals()`` of tune or compare)."""
    spec = task_spec(given["task"], given["data"], **{k: given[k] for k in TASK_KEYS})
    return spec, run_options(spec.kind, **{k: given[k] for k in RUN_KEYS})


def run_options(kind: str, **given) -> dict[str, Any]:
    """The recipe options of a task kind: the options given, minus those of the other kind left at their default."""
    lm_only = ("max_new_tokens", "packing")
    if kind == "classification":
        if given.get("packing"):
            raise SubspacesError("--packing applies to causal-LM tasks")
        return {k: v for k, v in given.items() if k not in lm_only}
    return given
