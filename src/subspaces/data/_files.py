"""A user's data file as a task: ``.jsonl``/``.json``/``.csv``/``.parquet`` or a ``datasets.save_to_disk`` folder,
read by Hugging Face ``datasets`` (no parser of ours), checked column by column with one-line errors."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from .._errors import SubspacesError

BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def read_table(path: str | Path, split: str | None = None) -> Any:
    """The rows of ``path`` as a ``datasets.Dataset``; ``split`` picks one split of a saved ``DatasetDict``."""
    path = Path(path)
    if not path.exists():
        raise SubspacesError(f"data {path}: no such file or folder")
    if path.is_file() and path.stat().st_size == 0:
        raise SubspacesError(f"data {path}: the file is empty")
    import datasets

    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parse errors become our one-line error
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
        elif path.suffix.lower() in BUILDERS:
            ds = datasets.load_dataset(BUILDERS[path.suffix.lower()], data_files=str(path), split="train")
        else:
            raise SubspacesError(f"data {path}: unsupported file type {path.suffix or '(none)'!r}; use "
                                 f"{', '.join(BUILDERS)} or a folder written by datasets' save_to_disk")
    except SubspacesError:
        raise
    except FileNotFoundError:
        raise SubspacesError(f"data {path}: not a folder written by datasets' save_to_disk") from None
    except Exception as e:  # datasets wraps the parser's error in its own
        cause = e.__cause__ or e.__context__ or e
        detail = (str(cause).strip().splitlines() or [""])[0][:200]
        raise SubspacesError(f"data {path}: cannot read it ({type(cause).__name__}: {detail})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise SubspacesError(f"data {path}: no split {name!r}; splits found: {', '.join(ds)}")
        ds = ds[name]
    elif split not in (None, "train"):
        raise SubspacesError(f"data {path}: a single table has no split {split!r} (only a saved DatasetDict has)")
    if len(ds) == 0:
        raise SubspacesError(f"data {path}: no rows")
    return ds


def _column(ds: Any, name: str, path: Path, flag: str) -> list:
    if name not in ds.column_names:
        raise SubspacesError(f"data {path}: no column {name!r} ({flag}); columns found: {', '.join(ds.column_names)}")
    return ds[name]


def classification_rows(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                        split: str | None = None) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of a classification file; a ``ClassLabel`` column gives its names."""
    path = Path(path)
    ds = read_table(path, split)
    texts = _column(ds, text_column, path, "--text-column")
    labels = _column(ds, label_column, path, "--label-column")
    if not all(isinstance(t, str) for t in texts):
        raise SubspacesError(f"data {path}: column {text_column!r} must hold strings")
    feature = ds.features[label_column]
    if hasattr(feature, "int2str"):
        labels = [feature.int2str(y) for y in labels]
    bad = next((y for y in labels if isinstance(y, bool) or not isinstance(y, (str, int))), None)
    if bad is not None:
        raise SubspacesError(f"data {path}: label {bad!r} in {label_column!r}: labels must be strings or integers")
    return texts, [str(y) for y in labels]


def sorted_labels(labels: list[str]) -> list[str]:
    """Integer labels in numeric order, others alphabetically."""
    if all(y.lstrip("-").isdigit() for y in labels):
        return sorted(set(labels), key=int)
    return sorted(set(labels))


def classification_task(path: str | Path, *, text_column: str = "text", label_column: str = "label",
                        validation: str | Path | None = None, test_fraction: float = 0.2, split: str | None = None,
                        seed: int = 0):
    """A :class:`TextTask` from a file: the test set is ``validation`` (a second file with the same columns) or a
    stratified ``test_fraction`` of the rows, drawn with ``seed``."""
    from . import TextTask, _split

    texts, labels = classification_rows(path, text_column=text_column, label_column=label_column, split=split)
    names = sorted_labels(labels)
    if len(names) < 2:
        raise SubspacesError(f"data {path}: column {label_column!r} has one class ({names[0]!r}); a classifier "
                             f"needs two or more")
    meta = {"data": str(path), "text_column": text_column, "label_column": label_column}
    if validation is None:
        return _split(Path(path).stem, list(zip(texts, labels)), names, seed=seed, test_fraction=test_fraction,
                      meta=meta)
    v_texts, v_labels = classification_rows(validation, text_column=text_column, label_column=label_column)
    unknown = sorted(set(v_labels) - set(names))
    if unknown:
        raise SubspacesError(f"data {validation}: labels not in the training data: {', '.join(unknown[:10])}")
    index = {y: i for i, y in enumerate(names)}
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return TextTask(Path(path).stem, names, [texts[i] for i in order], [index[labels[i]] for i in order],
                    v_texts, [index[y] for y in v_labels], meta={**meta, "validation": str(validation), "seed": seed})


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    ok = isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)
    if not ok:
        raise SubspacesError(f"{where}: expected a list of {{'role': ..., 'content': ...}} messages")
    if value[-1]["role"] != "assistant" or len(value) < 2:
        raise SubspacesError(f"{where}: the last message must be the assistant's answer, after at least one other")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def sft_rows(path: str | Path, *, prompt_column: str | None = None, completion_column: str | None = None,
             messages_column: str | None = None, split: str | None = None) -> list[dict[str, Any]]:
    """Prompt / completion rows of a causal-LM file: the named columns, else a ``messages`` column (chat: the last
    assistant message is the completion), else ``prompt`` and ``completion`` columns."""
    path = Path(path)
    ds = read_table(path, split)
    cols = ds.column_names
    if messages_column is None and prompt_column is None and completion_column is None:
        if "messages" in cols:
            messages_column = "messages"
        elif {"prompt", "completion"} <= set(cols):
            prompt_column, completion_column = "prompt", "completion"
        else:
            raise SubspacesError(f"data {path}: give --prompt-column and --completion-column, or a 'messages' column "
                                 f"in the chat format; columns found: {', '.join(cols)}")
    if messages_column is not None:
        chats = _column(ds, messages_column, path, "--messages-column")
        rows = []
        for i, chat in enumerate(chats):
            msgs = _messages(chat, f"data {path}: row {i} of {messages_column!r}")
            rows.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
        return rows
    if prompt_column is None or completion_column is None:
        raise SubspacesError("give both --prompt-column and --completion-column")
    prompts = _column(ds, prompt_column, path, "--prompt-column")
    completions = _column(ds, completion_column, path, "--completion-column")
    for col, values in ((prompt_column, prompts), (completion_column, completions)):
        if not all(isinstance(v, str) for v in values):
            raise SubspacesError(f"data {path}: column {col!r} must hold strings")
    return [{"prompt": p, "completion": c} for p, c in zip(prompts, completions)]


def sft_task(path: str | Path, *, prompt_column: str | None = None, completion_column: str | None = None,
             messages_column: str | None = None, validation: str | Path | None = None, test_fraction: float = 0.1,
             split: str | None = None, answer_pattern: str | None = None, seed: int = 0):
    """An :class:`SFTTask` from a file: the test set is ``validation`` (same columns) or ``test_fraction`` of the
    rows (at least one), drawn with ``seed``."""
    from ._sft import GSM8K_ANSWER, SFTTask

    cols = dict(prompt_column=prompt_column, completion_column=completion_column, messages_column=messages_column)
    rows = sft_rows(path, split=split, **cols)
    if not 0.0 < test_fraction < 1.0:
        raise SubspacesError(f"test_fraction={test_fraction!r}: must be strictly between 0 and 1")
    random.Random(seed).shuffle(rows)
    if validation is not None:
        train, test = rows, sft_rows(validation, **cols)
    else:
        if len(rows) < 2:
            raise SubspacesError(f"data {path}: one row; need two or more to hold some out (or give --validation)")
        k = min(max(1, round(len(rows) * test_fraction)), len(rows) - 1)
        train, test = rows[k:], rows[:k]
    pattern = GSM8K_ANSWER if answer_pattern is None else answer_pattern
    return SFTTask(Path(path).stem, train, test, answer_pattern=pattern,
                   meta={"data": str(path), "validation": str(validation) if validation else None, "seed": seed})
